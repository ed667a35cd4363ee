package openapi

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers/gorillamux"
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

func TestEmbeddedDocsLoad(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"hydra-api.yaml", HydraYAML()},
		{"kiln-api.yaml", KilnYAML()},
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
	doc, err := Load(HydraYAML())
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
			header: http.Header{"Location": []string{"/build/1"}},
		},
		{
			name: "latest redirect without Location", method: "GET", target: "/job/p/j/x/latest", status: 302,
			header:  http.Header{},
			wantErr: "Location",
		},
		{
			name: "latest-for routes", method: "GET", target: "/job/p/j/x/latest-for/x86_64-linux", status: 302,
			header: http.Header{"Location": []string{"/build/1"}},
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
			req := httptest.NewRequest(tc.method, tc.target, nil)
			err := c.Check(context.Background(), req, tc.status, tc.header, []byte(tc.body))
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Check rejected a valid response: %v", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("Check accepted an invalid response (want an error mentioning %q)", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("Check error %q does not mention %q", err, tc.wantErr)
			}
		})
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
	doc, err := Load(HydraYAML())
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
	doc, err := Load(HydraYAML())
	if err != nil {
		t.Fatal(err)
	}
	fill := strings.NewReplacer(
		"{id}", "p", "{project-id}", "p", "{jobset-id}", "j", "{job-id}", "x",
		"{system}", "x86_64-linux", "{build-id}", "1", "{eval-id}", "2",
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
