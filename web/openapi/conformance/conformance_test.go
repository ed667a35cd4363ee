package conformance

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/kilnci/kiln/web/openapi"
)

// buildJSON is a build as Hydra's GET /build/{id} returns it (with finished
// as a boolean, as the spec types it).
const buildJSON = `{
  "id": 1,
  "finished": true,
  "buildstatus": 0,
  "timestamp": 1588365711,
  "starttime": 1588365711,
  "stoptime": 1588365712,
  "project": "example-hello",
  "jobset": "hello",
  "job": "hello",
  "nixname": "hello-2.10",
  "system": "x86_64-linux",
  "priority": 100,
  "releasename": null,
  "drvpath": "/nix/store/ab9zv2y5gm8hr6g318p0s6kaclwj4slr-hello-2.10.drv",
  "jobsetevals": [1],
  "buildoutputs": {"out": {"path": "/nix/store/y26qxcq1gg2hrqpxdc58b2fghv2bhxjg-hello-2.10"}},
  "buildproducts": {},
  "buildmetrics": {"time": {"name": "time", "value": 1.5, "unit": "s"}}
}`

func jsonHeader() http.Header {
	return http.Header{"Content-Type": []string{"application/json"}}
}

// redirectHeader is what Kiln's redirects carry: a Location and a JSON body.
func redirectHeader(to string) http.Header {
	return http.Header{"Content-Type": []string{"application/json"}, "Location": []string{to}}
}

func TestEmbeddedDocsLoad(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"hydra-api.yaml", openapi.HydraYAML()},
		{"kiln-api.yaml", openapi.KilnYAML()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc, err := Load(tc.data)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if _, err := NewChecker(doc); err != nil {
				t.Fatalf("NewChecker: %v", err)
			}
		})
	}
}

func TestLoadValidatesExamples(t *testing.T) {
	const doc = `openapi: "3.0.3"
info: {title: t, version: "1"}
paths:
  /x:
    get:
      responses:
        '200':
          description: ok
          content:
            application/json:
              schema: {type: object, properties: {finished: {type: boolean}}}
              example: {finished: 1}
`
	if _, err := Load([]byte(doc)); err == nil {
		t.Fatal("Load accepted an example that does not match its schema")
	}
}

func hydraChecker(t *testing.T) *Checker {
	t.Helper()
	doc, err := Load(openapi.HydraYAML())
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	c, err := NewChecker(doc)
	if err != nil {
		t.Fatalf("NewChecker: %v", err)
	}
	return c
}

func TestCheckHydra(t *testing.T) {
	c := hydraChecker(t)
	for _, tc := range []struct {
		name    string
		method  string
		target  string
		status  int
		header  http.Header
		body    string
		wantErr string // "" when the response must be accepted
	}{
		{
			name: "build", method: "GET", target: "/build/1", status: 200,
			header: jsonHeader(), body: buildJSON,
		},
		{
			name: "build on a loopback URL", method: "GET", target: "http://127.0.0.1:43210/build/1", status: 200,
			header: http.Header{"Content-Type": []string{"application/json; charset=utf-8"}}, body: buildJSON,
		},
		{
			name: "buildstatus as string", method: "GET", target: "/build/1", status: 200,
			header: jsonHeader(), body: strings.Replace(buildJSON, `"buildstatus": 0`, `"buildstatus": "0"`, 1),
			wantErr: "buildstatus",
		},
		{
			name: "missing finished", method: "GET", target: "/build/1", status: 200,
			header: jsonHeader(), body: strings.Replace(buildJSON, `"finished": true,`, ``, 1),
			wantErr: "finished",
		},
		{
			name: "finished as integer", method: "GET", target: "/build/1", status: 200,
			header: jsonHeader(), body: strings.Replace(buildJSON, `"finished": true`, `"finished": 1`, 1),
			wantErr: "finished",
		},
		{
			name: "undeclared status", method: "GET", target: "/build/1", status: 418,
			header: jsonHeader(), body: `{"error":"teapot"}`,
			wantErr: "not declared",
		},
		{
			name: "undeclared redirect status that kin-openapi skips", method: "GET", target: "/build/1", status: 301,
			header:  http.Header{"Location": []string{"/build/2"}},
			wantErr: "not declared",
		},
		{
			name: "wrong content type", method: "GET", target: "/build/1", status: 200,
			header: http.Header{"Content-Type": []string{"text/html"}}, body: buildJSON,
			wantErr: "Content-Type",
		},
		{
			name: "latest redirect", method: "GET", target: "/job/p/j/x/latest", status: 302,
			header: redirectHeader("/build/1"), body: `{"redirect":"/build/1"}`,
		},
		{
			name: "latest redirect without Location", method: "GET", target: "/job/p/j/x/latest", status: 302,
			header: jsonHeader(), body: `{"redirect":"/build/1"}`,
			wantErr: "Location",
		},
		{
			name: "latest redirect without a body", method: "GET", target: "/job/p/j/x/latest", status: 302,
			header:  http.Header{"Location": []string{"/build/1"}},
			wantErr: "Content-Type",
		},
		{
			name: "latest redirect body without redirect", method: "GET", target: "/job/p/j/x/latest", status: 302,
			header: redirectHeader("/build/1"), body: `{}`,
			wantErr: "redirect",
		},
		{
			name: "latest-for routes", method: "GET", target: "/job/p/j/x/latest-for/x86_64-linux", status: 302,
			header: redirectHeader("/build/1"), body: `{"redirect":"/build/1"}`,
		},
		{
			name: "raw build log", method: "GET", target: "/build/1/log/raw", status: 200,
			header: http.Header{"Content-Type": []string{"text/plain; charset=utf-8"}}, body: "building...\n",
		},
		{
			name: "step log", method: "GET", target: "/build/1/nixlog/2", status: 200,
			header: http.Header{"Content-Type": []string{"text/plain; charset=utf-8"}}, body: "building...\n",
		},
		{
			name: "raw step log not on this node yet", method: "GET", target: "/build/1/nixlog/2/raw", status: 503,
			header: jsonHeader(), body: `{"error":"unavailable: log of /nix/store/x.drv is not on this node yet"}`,
		},
		{
			name: "project created", method: "PUT", target: "/project/p", status: 201,
			header: redirectHeader("/project/p"), body: `{"uri":"/project/p","name":"p","redirect":"/project/p","type":"project"}`,
		},
		{
			name: "project created without uri", method: "PUT", target: "/project/p", status: 201,
			header: redirectHeader("/project/p"), body: `{"name":"p","redirect":"/project/p","type":"project"}`,
			wantErr: "uri",
		},
		{
			name: "push to an unknown jobset", method: "POST", target: "/api/push?jobsets=p:nope", status: 404,
			header: jsonHeader(), body: `{"error":"not found: jobset p:nope"}`,
		},
		{
			name: "conflict is not a Hydra status", method: "PUT", target: "/jobset/p/j", status: 409,
			header: jsonHeader(), body: `{"error":"conflict"}`,
			wantErr: "not declared",
		},
		{
			name: "root", method: "GET", target: "/", status: 200,
			header: jsonHeader(), body: `[]`,
		},
		{
			name: "unknown build", method: "GET", target: "/build/99", status: 404,
			header: jsonHeader(), body: `{"error":"x"}`,
		},
		{
			name: "unknown build with empty error", method: "GET", target: "/build/99", status: 404,
			header: jsonHeader(), body: `{"error":""}`,
			wantErr: "error",
		},
		{
			name: "build log", method: "GET", target: "/build/1/log", status: 200,
			header: http.Header{"Content-Type": []string{"text/plain; charset=utf-8"}}, body: "building...\n",
		},
		{
			name: "evals page", method: "GET", target: "/jobset/p/j/evals", status: 200,
			header: jsonHeader(),
			body:   `{"first":"?page=1","last":"?page=1","evals":[{"id":2,"timestamp":1,"hasnewbuilds":true,"builds":[2],"jobsetevalinputs":{"src":{"type":"git","uri":"https://x","revision":"abc","value":null,"dependency":null}}}]}`,
		},
		{
			name: "evals as an array", method: "GET", target: "/jobset/p/j/evals", status: 200,
			header: jsonHeader(), body: `[{"first":"?page=1","last":"?page=1","evals":[]}]`,
			wantErr: "object",
		},
		{
			name: "unknown route answered 404", method: "GET", target: "/no/such/route", status: 404,
			header: jsonHeader(), body: `{"error":"not found"}`,
		},
		{
			name: "unknown method answered 405", method: "PATCH", target: "/build/1", status: 405,
			header: jsonHeader(), body: `{"error":"method not allowed"}`,
		},
		{
			name: "unknown route answered 200", method: "GET", target: "/no/such/route", status: 200,
			header: jsonHeader(), body: `{}`,
			wantErr: "no such operation",
		},
		{
			name: "unknown route answered with plain text 404", method: "GET", target: "/no/such/route", status: 404,
			header: http.Header{"Content-Type": []string{"text/plain"}}, body: "404 page not found\n",
			wantErr: "Content-Type",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expectCheck(t, c, httptest.NewRequest(tc.method, tc.target, nil), tc.status, tc.header, tc.body, tc.wantErr)
		})
	}
}

// expectCheck checks one response: accepted when wantErr is empty, else
// refused with an error mentioning wantErr.
func expectCheck(t *testing.T, c *Checker, req *http.Request, status int, header http.Header, body, wantErr string) {
	t.Helper()
	err := c.Check(context.Background(), req, status, header, []byte(body))
	switch {
	case wantErr == "" && err != nil:
		t.Fatalf("Check rejected a valid response: %v", err)
	case wantErr != "" && err == nil:
		t.Fatalf("Check accepted an invalid response (want an error mentioning %q)", wantErr)
	case wantErr != "" && !strings.Contains(err.Error(), wantErr):
		t.Fatalf("Check error %q does not mention %q", err, wantErr)
	}
}

func TestCheckError(t *testing.T) {
	c := hydraChecker(t)
	for _, tc := range []struct {
		name    string
		status  int
		header  http.Header
		body    string
		wantErr bool
	}{
		{"json error", 404, jsonHeader(), `{"error":"no such build"}`, false},
		{"json error with charset", 405, http.Header{"Content-Type": []string{"application/json; charset=utf-8"}}, `{"error":"no"}`, false},
		{"non-JSON body", 404, jsonHeader(), "404 page not found\n", true},
		{"plain text content type", 404, http.Header{"Content-Type": []string{"text/plain"}}, `{"error":"x"}`, true},
		{"no content type", 404, http.Header{}, `{"error":"x"}`, true},
		{"no error member", 404, jsonHeader(), `{"message":"x"}`, true},
		{"empty error", 404, jsonHeader(), `{"error":""}`, true},
		{"error not a string", 404, jsonHeader(), `{"error":1}`, true},
		{"JSON array", 404, jsonHeader(), `["x"]`, true},
		{"JSON null", 404, jsonHeader(), `null`, true},
		{"success status", 200, jsonHeader(), `{"error":"x"}`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := c.CheckError(tc.status, tc.header, []byte(tc.body))
			if (err != nil) != tc.wantErr {
				t.Fatalf("CheckError = %v, want error: %v", err, tc.wantErr)
			}
		})
	}
}

// TestKinOpenAPIAcceptsUndeclaredStatus pins the kin-openapi behaviour that
// Check works around: with default options ValidateResponse accepts a status
// the operation does not declare. If this starts failing, kin-openapi changed
// its default and the extra check in Check may be simplified.
func TestKinOpenAPIAcceptsUndeclaredStatus(t *testing.T) {
	doc, err := Load(openapi.HydraYAML())
	if err != nil {
		t.Fatal(err)
	}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	// The document's server is https://hydra.nixos.org, so route a request
	// to it (a loopback URL would not match; NewChecker ignores servers).
	req := httptest.NewRequest("GET", "https://hydra.nixos.org/build/1", nil)
	route, params, err := router.FindRoute(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := router.FindRoute(httptest.NewRequest("GET", "http://127.0.0.1/build/1", nil)); err == nil {
		t.Error("gorillamux routed a loopback URL despite the document's servers")
	}
	input := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route},
		Status:                 418,
		Header:                 jsonHeader(),
	}
	input.SetBodyBytes([]byte(`{"error":"teapot"}`))
	if err := openapi3filter.ValidateResponse(context.Background(), input); err != nil {
		t.Fatalf("kin-openapi now rejects undeclared statuses by default: %v", err)
	}
}

// TestEveryPathRoutes checks that the router sends a request for each path
// of the Hydra spec (parameters filled in) to that path's own operations.
func TestEveryPathRoutes(t *testing.T) {
	c := hydraChecker(t)
	doc, err := Load(openapi.HydraYAML())
	if err != nil {
		t.Fatal(err)
	}
	fill := strings.NewReplacer(
		"{id}", "p", "{project-id}", "p", "{jobset-id}", "j", "{job-id}", "x",
		"{system}", "x86_64-linux", "{build-id}", "1", "{eval-id}", "2", "{step-nr}", "3",
	)
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			target := fill.Replace(path)
			if strings.Contains(target, "{") {
				t.Fatalf("test does not know a parameter of %s", path)
			}
			route, _, err := c.router.FindRoute(httptest.NewRequest(method, target, nil))
			if err != nil {
				t.Errorf("%s %s: %v", method, target, err)
				continue
			}
			if route.Path != path || route.Method != method {
				t.Errorf("%s %s routed to %s %s, want %s %s", method, target, route.Method, route.Path, method, path)
			}
		}
	}
}

func kilnDoc(t *testing.T) *openapi3.T {
	t.Helper()
	doc, err := Load(openapi.KilnYAML())
	if err != nil {
		t.Fatalf("Load(openapi.KilnYAML()): %v", err)
	}
	return doc
}

func kilnChecker(t *testing.T) *Checker {
	t.Helper()
	c, err := NewChecker(kilnDoc(t))
	if err != nil {
		t.Fatalf("NewChecker: %v", err)
	}
	return c
}

// TestKilnPathsUnderAPIv1 checks that Kiln's own description stays under
// /api/v1 (the Hydra paths belong in hydra-api.yaml).
func TestKilnPathsUnderAPIv1(t *testing.T) {
	doc := kilnDoc(t)
	if doc.Paths.Len() == 0 {
		t.Fatal("kiln-api.yaml has no paths")
	}
	for _, path := range doc.Paths.InMatchingOrder() {
		if !strings.HasPrefix(path, "/api/v1/") {
			t.Errorf("path %s is not under /api/v1/", path)
		}
	}
}

// TestEveryKilnPathRoutes is TestEveryPathRoutes for kiln-api.yaml.
func TestEveryKilnPathRoutes(t *testing.T) {
	c := kilnChecker(t)
	fill := strings.NewReplacer(
		"{project}", "p", "{jobset}", "j", "{eval}", "2", "{id}", "1", "{name}", "alice", "{lease}", "7", "{attempt}", "1",
		"{drv}", "ab9zv2y5gm8hr6g318p0s6kaclwj4slr-hello-2.10.drv",
	)
	for path, item := range kilnDoc(t).Paths.Map() {
		for method := range item.Operations() {
			target := fill.Replace(path)
			if strings.Contains(target, "{") {
				t.Fatalf("test does not know a parameter of %s", path)
			}
			req := httptest.NewRequest(method, target, nil)
			if got, want := c.Operation(req), method+" "+path; got != want {
				t.Errorf("%s %s routed to %q, want %q", method, target, got, want)
			}
		}
	}
}

// TestOperationsDeclareTheirErrors checks the statuses every operation of
// both documents must declare: 400 and 503 everywhere (min_index), 401 and
// 403 on operations that need credentials, 400 and 413 on those that take
// a JSON body; never a default response or a 500, and on Kiln's paths
// X-Kiln-Index on every response.
func TestOperationsDeclareTheirErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
		kiln bool
	}{{"hydra-api.yaml", openapi.HydraYAML(), false}, {"kiln-api.yaml", openapi.KilnYAML(), true}} {
		t.Run(tc.name, func(t *testing.T) {
			doc, err := Load(tc.data)
			if err != nil {
				t.Fatal(err)
			}
			for path, item := range doc.Paths.Map() {
				for method, op := range item.Operations() {
					name := method + " " + path
					want := []string{"400", "503"}
					if op.Security != nil && len(*op.Security) > 0 || !tc.kiln && method != "GET" && path != "/login" {
						want = append(want, "401", "403")
					}
					if op.RequestBody != nil {
						want = append(want, "413")
					}
					for _, code := range want {
						if op.Responses.Value(code) == nil {
							t.Errorf("%s does not declare %s", name, code)
						}
					}
					if op.Responses.Default() != nil {
						t.Errorf("%s has a default response", name)
					}
					if op.Responses.Value("500") != nil {
						t.Errorf("%s declares 500", name)
					}
					if !tc.kiln {
						continue
					}
					if op.Security == nil {
						t.Errorf("%s does not say whether it needs credentials (security)", name)
					}
					for code, r := range op.Responses.Map() {
						h := r.Value.Headers["X-Kiln-Index"]
						if h == nil || !h.Value.Required {
							t.Errorf("%s %s does not require X-Kiln-Index", name, code)
						}
					}
				}
			}
		})
	}
}

func kilnHeader(ct string, kv ...string) http.Header {
	h := http.Header{"X-Kiln-Index": []string{"42"}}
	if ct != "" {
		h.Set("Content-Type", ct)
	}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	return h
}

// kilnBuildJSON is a queued build as /api/v1/builds/{id} returns it.
const kilnBuildJSON = `{"id":3,"project":"p","jobset":"j","job":"top","drv_path":"/nix/store/ab9zv2y5gm8hr6g318p0s6kaclwj4slr-top.drv",
"system":"x86_64-linux","nix_name":"top","priority":0,"global_priority":0,"finished":false,"buildstatus":null,"status":"queued",
"created_at":1700000000,"outputs":{"out":"/nix/store/y26qxcq1gg2hrqpxdc58b2fghv2bhxjg-top"},"evaluations":[1],"restarts":0,
"state_history":[{"at":1700000000,"state":"queued"}]}`

const kilnMetaJSON = `{"first":"/api/v1/builds?page=1&per_page=50","last":"/api/v1/builds?page=1&per_page=50","next":null,"previous":null,"page":1,"pages":1,"per_page":50,"total":1}`

const kilnEvalJSON = `{"id":2,"project":"p","jobset":"j","timestamp":1700000000,"checkout_time":2,"eval_time":5,"has_new_builds":true,"flake":"",
"inputs":{"src":{"type":"git","value":"https://example.com/p.git","revision":"0123abcd","uri":"https://example.com/p.git"}},"builds":[3],"cancelled":false`

func TestCheckKiln(t *testing.T) {
	c := kilnChecker(t)
	jsonCT := "application/json"
	for _, tc := range []struct {
		name    string
		method  string
		target  string
		status  int
		header  http.Header
		body    string
		wantErr string
	}{
		{name: "build", method: "GET", target: "/api/v1/builds/3", status: 200, header: kilnHeader(jsonCT), body: kilnBuildJSON},
		{name: "build without X-Kiln-Index", method: "GET", target: "/api/v1/builds/3", status: 200,
			header: jsonHeader(), body: kilnBuildJSON, wantErr: "X-Kiln-Index"},
		{name: "build without buildstatus", method: "GET", target: "/api/v1/builds/3", status: 200, header: kilnHeader(jsonCT),
			body: strings.Replace(kilnBuildJSON, `"buildstatus":null,`, ``, 1), wantErr: "buildstatus"},
		{name: "build with start_time", method: "GET", target: "/api/v1/builds/3", status: 200, header: kilnHeader(jsonCT),
			body: strings.Replace(kilnBuildJSON, `"created_at":1700000000,`, `"created_at":1700000000,"start_time":1700000001,`, 1)},
		{name: "build list", method: "GET", target: "/api/v1/builds?status=failed", status: 200, header: kilnHeader(jsonCT),
			body: `{"items":[` + kilnBuildJSON + `],"meta":` + kilnMetaJSON + `}`},
		{name: "build list without meta", method: "GET", target: "/api/v1/builds", status: 200, header: kilnHeader(jsonCT),
			body: `{"items":[]}`, wantErr: "meta"},
		{name: "bad filter", method: "GET", target: "/api/v1/builds?status=broken", status: 400, header: kilnHeader(jsonCT),
			body: `{"error":"invalid argument: status \"broken\""}`},
		{name: "min_index not reached", method: "GET", target: "/api/v1/builds/3?min_index=999", status: 503, header: kilnHeader(jsonCT),
			body: `{"error":"unavailable: this node has applied 42, not yet 999"}`},
		{name: "error without X-Kiln-Index", method: "GET", target: "/api/v1/builds/3", status: 404, header: jsonHeader(),
			body: `{"error":"not found: build 3"}`, wantErr: "X-Kiln-Index"},
		{name: "restart", method: "POST", target: "/api/v1/builds/3/restart", status: 202, header: kilnHeader(jsonCT), body: kilnBuildJSON},
		{name: "restart answering 200", method: "POST", target: "/api/v1/builds/3/restart", status: 200, header: kilnHeader(jsonCT),
			body: kilnBuildJSON, wantErr: "not declared"},
		{name: "submission", method: "POST", target: "/api/v1/builds", status: 201,
			header: kilnHeader(jsonCT, "Location", "/api/v1/builds/3"), body: kilnBuildJSON},
		{name: "submission without Location", method: "POST", target: "/api/v1/builds", status: 201,
			header: kilnHeader(jsonCT), body: kilnBuildJSON, wantErr: "Location"},
		{name: "evaluation in a list", method: "GET", target: "/api/v1/evaluations", status: 200, header: kilnHeader(jsonCT),
			body: `{"items":[` + kilnEvalJSON + `}],"meta":` + kilnMetaJSON + `}`},
		{name: "one evaluation", method: "GET", target: "/api/v1/evaluations/2", status: 200, header: kilnHeader(jsonCT),
			body: kilnEvalJSON + `,"finished":false,"counts":{"total":1,"queued":1,"succeeded":0,"failed":0}}`},
		{name: "one evaluation without counts", method: "GET", target: "/api/v1/evaluations/2", status: 200, header: kilnHeader(jsonCT),
			body: kilnEvalJSON + `}`, wantErr: "counts"},
		{name: "delete", method: "DELETE", target: "/api/v1/projects/p", status: 204, header: kilnHeader("")},
		{name: "short status down", method: "GET", target: "/api/v1/status/short", status: 503, header: kilnHeader(jsonCT),
			body: `{"ok":false,"reason":"no live agent"}`},
		{name: "short status min_index", method: "GET", target: "/api/v1/status/short", status: 503, header: kilnHeader(jsonCT),
			body: `{"error":"unavailable: this node has applied 42, not yet 999"}`},
		{name: "short status up", method: "GET", target: "/api/v1/status/short", status: 200, header: kilnHeader(jsonCT), body: `{"ok":true}`},
		{name: "short status up saying false", method: "GET", target: "/api/v1/status/short", status: 200, header: kilnHeader(jsonCT),
			body: `{"ok":false}`, wantErr: "ok"},
		{name: "step log", method: "GET", target: "/api/v1/steps/ab9zv2y5gm8hr6g318p0s6kaclwj4slr-top.drv/logs/1", status: 200,
			header: kilnHeader("text/plain; charset=utf-8", "ETag", `"x"`), body: "building top\n"},
		{name: "live log", method: "GET", target: "/api/v1/leases/7/log?offset=3", status: 200,
			header: kilnHeader("text/plain; charset=utf-8", "X-Kiln-Log-Size", "12", "X-Kiln-Log-Done", "false"), body: "lding top\n"},
		{name: "live log without its size", method: "GET", target: "/api/v1/leases/7/log", status: 200,
			header: kilnHeader("text/plain; charset=utf-8", "X-Kiln-Log-Done", "true"), body: "", wantErr: "X-Kiln-Log-Size"},
		{name: "cluster", method: "GET", target: "/api/v1/cluster", status: 200, header: kilnHeader(jsonCT),
			body: `{"node":"c1","state":"Leader","leader":"c1","applied_index":42,"commit_index":42,"members":[{"id":"c1","raft_addr":"127.0.0.1:7000","http_addr":"127.0.0.1:8080","voter":true,"leader":true},{"id":"c2","raft_addr":"127.0.0.1:7001","voter":true,"leader":false}]}`},
		{name: "scrub report", method: "GET", target: "/api/v1/cache/scrub", status: 200, header: kilnHeader(jsonCT, "X-Kiln-Scrubbed", "2"),
			body: `{"started":"2024-01-02T03:04:05.123456789Z","finished":"2024-01-02T03:04:06Z","checked":2,"corrupt":[],"missing":[],"repaired":[],"unrepaired":[]}`},
		{name: "user", method: "PUT", target: "/api/v1/users/alice", status: 200, header: kilnHeader(jsonCT),
			body: `{"username":"alice","fullname":"","emailaddress":"","userroles":[]}`},
		{name: "unknown route", method: "GET", target: "/api/v1/nothing-here", status: 404, header: kilnHeader(jsonCT),
			body: `{"error":"no such endpoint: /api/v1/nothing-here"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expectCheck(t, c, httptest.NewRequest(tc.method, tc.target, nil), tc.status, tc.header, tc.body, tc.wantErr)
		})
	}
}

// TestServedDocumentsConform checks the two documents, as /api/v1 serves
// them, against their own operations.
func TestServedDocumentsConform(t *testing.T) {
	c := kilnChecker(t)
	for path, data := range map[string][]byte{"/api/v1/openapi.yaml": openapi.KilnYAML(), "/api/v1/hydra-openapi.yaml": openapi.HydraYAML()} {
		req := httptest.NewRequest("GET", path, nil)
		if err := c.Check(context.Background(), req, 200, kilnHeader("application/yaml"), data); err != nil {
			t.Errorf("%s: %v", path, err)
		}
	}
}
