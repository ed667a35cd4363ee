package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/web/openapi"
	"github.com/kilnci/kiln/web/openapi/conformance"
)

// apiClient makes REST calls and checks every answer against the
// corrected Hydra spec (Hydra's paths) or Kiln's own OpenAPI file
// (/api/v1), recording which operations answered with success and error.
type apiClient struct {
	t           *testing.T
	hydra, kiln *conformance.Checker
	covered     map[string]map[string]bool // operation → "ok" / "error"
	cookie      string
}

func newAPIClient(t *testing.T) *apiClient {
	t.Helper()
	c := &apiClient{t: t, covered: map[string]map[string]bool{}}
	for _, d := range []struct {
		data []byte
		into **conformance.Checker
	}{{openapi.HydraYAML(), &c.hydra}, {openapi.KilnYAML(), &c.kiln}} {
		doc, err := conformance.Load(d.data)
		if err != nil {
			t.Fatal(err)
		}
		if *d.into, err = conformance.NewChecker(doc); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// Credentials a call carries.
const (
	asNobody  = ""
	asAdmin   = "admin"
	asBasic   = "basic"
	asWrong   = "wrong"
	asSession = "session"
)

type apiResult struct {
	status int
	header http.Header
	body   []byte
}

func (r apiResult) json(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decoding %s: %v", r.body, err)
	}
}

// do sends one request to node addr and checks the answer has status want
// and conforms to the spec.
func (c *apiClient) do(addr, method, path string, body any, auth string, want int, hdr ...string) apiResult {
	c.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = strings.NewReader(b)
	default:
		enc, err := json.Marshal(b)
		if err != nil {
			c.t.Fatal(err)
		}
		rd = bytes.NewReader(enc)
	}
	req, err := http.NewRequest(method, "http://"+addr+path, rd)
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Accept", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	switch auth {
	case asAdmin:
		req.Header.Set("Authorization", "Bearer "+testToken)
	case asBasic:
		req.SetBasicAuth("nix", testToken)
	case asWrong:
		req.Header.Set("Authorization", "Bearer wrong-token")
	case asSession:
		req.Header.Set("Cookie", c.cookie)
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		c.t.Fatal(err)
	}
	res := apiResult{resp.StatusCode, resp.Header, b}
	if res.status != want {
		c.t.Errorf("%s %s: status %d, want %d: %s", method, path, res.status, want, trunc(b))
	}
	chk := c.hydra
	if strings.HasPrefix(path, "/api/v1/") {
		chk = c.kiln
	}
	// The checker sees the request as sent (no body needed).
	creq, _ := http.NewRequest(method, "http://"+addr+path, nil)
	if err := chk.Check(context.Background(), creq, res.status, res.header, b); err != nil {
		c.t.Errorf("spec: %v\nbody: %s", err, trunc(b))
	}
	if op := chk.Operation(creq); op != "" {
		if c.covered[op] == nil {
			c.covered[op] = map[string]bool{}
		}
		kind := "ok"
		if res.status >= 400 {
			kind = "error"
		}
		c.covered[op][kind] = true
	}
	if res.status >= 400 && res.header.Get("Content-Type") != "application/json" {
		c.t.Errorf("%s %s: error with Content-Type %q", method, path, res.header.Get("Content-Type"))
	}
	return res
}

func trunc(b []byte) string {
	if len(b) > 400 {
		return string(b[:400]) + "…"
	}
	return string(b)
}

// missingCoverage lists operations of doc not seen answering both with
// success and with an error.
func (c *apiClient) missingCoverage(data []byte) []string {
	doc, err := conformance.Load(data)
	if err != nil {
		c.t.Fatal(err)
	}
	var out []string
	for _, op := range conformance.Operations(doc) {
		for _, kind := range []string{"ok", "error"} {
			if !c.covered[op][kind] {
				out = append(out, op+" ("+kind+")")
			}
		}
	}
	slices.Sort(out)
	return out
}

func drvBase(p string) string { return strings.TrimPrefix(p, "/nix/store/") }

// chainJSON: the first name is an input of each of the others.
func chainJSON(names ...string) []map[string]any {
	var out []map[string]any
	for i, n := range names {
		node := map[string]any{"drv_path": storePathFor(n + ".drv"), "system": "x86_64-linux", "outputs": map[string]string{"out": storePathFor(n)}}
		if i > 0 {
			node["input_drvs"] = []string{storePathFor(names[0] + ".drv")}
		}
		out = append(out, node)
	}
	return out
}

// TestAPIConformsToSpecs exercises every endpoint of the Hydra-compatible
// API and /api/v1, with success and error answers, on a real 3-node
// cluster over loopback, and checks every answer against the specs.
func TestAPIConformsToSpecs(t *testing.T) {
	tc := startCluster(t, 3, withCacheKey(t), withAgents, func(_ int, cfg *Config) {
		cfg.MaxBodyBytes = 256 << 10
		cfg.MaxReadWait = 300 * time.Millisecond
		// The fake agent heartbeats only when the test says: it must stay
		// live (seen within a TTL) however slow the machine is.
		cfg.LeaseTTL = time.Minute
	})
	_, f := tc.follower()
	_, l := tc.leader(5 * time.Second)
	c := newAPIClient(t)
	fa, la := f.HTTPAddr(), l.HTTPAddr()

	// Before any agent: status says so.
	r := c.do(fa, "GET", "/api/v1/status/short", nil, asNobody, 503)
	if !strings.Contains(string(r.body), "no live agent") {
		t.Errorf("short status without agents: %s", r.body)
	}

	// Users and login.
	c.do(fa, "PUT", "/api/v1/users/alice", map[string]any{"fullname": "Alice", "emailaddress": "a@example.com", "userroles": []string{"cancel-build"}, "password": "correct horse"}, asNobody, 401)
	c.do(fa, "PUT", "/api/v1/users/alice", map[string]any{"password": "correct horse"}, asWrong, 403)
	c.do(fa, "PUT", "/api/v1/users/alice", map[string]any{"password": "short"}, asAdmin, 400)
	c.do(fa, "PUT", "/api/v1/users/alice", map[string]any{"password": "correct horse", "userroles": []string{"god"}}, asAdmin, 400)
	c.do(fa, "PUT", "/api/v1/users/alice", map[string]any{"fullname": "Alice", "emailaddress": "a@example.com", "userroles": []string{"cancel-build"}, "password": "correct horse"}, asAdmin, 200)
	c.do(fa, "PUT", "/api/v1/users/bob", map[string]any{"password": "bobs password"}, asBasic, 200)
	r = c.do(la, "GET", "/api/v1/users", nil, asAdmin, 200)
	var users []map[string]any
	r.json(t, &users)
	if len(users) != 2 {
		t.Errorf("users %v", users)
	}
	c.do(la, "GET", "/api/v1/users", nil, asNobody, 401)
	c.do(fa, "DELETE", "/api/v1/users/bob", nil, asAdmin, 204)
	c.do(fa, "DELETE", "/api/v1/users/bob", nil, asAdmin, 404)
	c.do(fa, "POST", "/login", `{"username":`, asNobody, 400)
	c.do(fa, "POST", "/login", map[string]string{"username": "alice", "password": "wrong password"}, asNobody, 403)
	c.do(fa, "POST", "/login", map[string]string{"username": "nobody", "password": "wrong password"}, asNobody, 403)
	r = c.do(la, "POST", "/login", map[string]string{"username": "alice", "password": "correct horse"}, asNobody, 200)
	for _, ck := range (&http.Response{Header: r.header}).Cookies() {
		if ck.Name == "kiln_session" {
			c.cookie = ck.Name + "=" + ck.Value
		}
	}
	if c.cookie == "" {
		t.Fatal("login set no session cookie")
	}
	// alice may cancel builds but not create projects.
	c.do(fa, "PUT", "/project/p", map[string]any{"displayname": "P"}, asSession, 403)

	// Projects and jobsets, Hydra's way (through a follower: forwarded).
	c.do(fa, "PUT", "/project/p", map[string]any{"displayname": "P"}, asNobody, 401)
	c.do(fa, "PUT", "/project/p", `{"displayname": 5}`, asAdmin, 400)
	c.do(fa, "PUT", "/project/p", bytes.Repeat([]byte(" "), 300<<10), asAdmin, 413)
	c.do(fa, "PUT", "/project/p", map[string]any{"name": "other"}, asAdmin, 400)
	c.do(fa, "PUT", "/project/bad%20name", map[string]any{}, asAdmin, 400)
	r = c.do(fa, "PUT", "/project/p", map[string]any{"displayname": "P", "description": "the p project", "enabled": "1", "visible": true, "owner": "alice", "declarative": map[string]string{"file": "x"}}, asAdmin, 201)
	idx, _ := strconv.ParseUint(r.header.Get("X-Kiln-Index"), 10, 64)
	if idx == 0 {
		t.Errorf("a write's answer has X-Kiln-Index %q", r.header.Get("X-Kiln-Index"))
	}
	c.do(fa, "PUT", "/project/p", map[string]any{"displayname": "P", "description": "the p project"}, asAdmin, 200)
	// A read at least as fresh as the write, from another node.
	other := tc.nodes[0].HTTPAddr()
	if other == fa {
		other = tc.nodes[1].HTTPAddr()
	}
	r = c.do(other, "GET", "/project/p", nil, asNobody, 200, "X-Kiln-Min-Index", strconv.FormatUint(idx, 10))
	if got, _ := strconv.ParseUint(r.header.Get("X-Kiln-Index"), 10, 64); got < idx {
		t.Errorf("read asked for index %d answered at %d", idx, got)
	}
	c.do(other, "GET", "/project/p?min_index=x", nil, asNobody, 400)
	c.do(other, "GET", "/project/p?min_index=99999999", nil, asNobody, 503)
	c.do(fa, "GET", "/project/nope", nil, asNobody, 404)
	r = c.do(fa, "GET", "/", nil, asNobody, 200)
	c.do(fa, "GET", "/?min_index=x", nil, asNobody, 400)
	c.do(fa, "PUT", "/jobset/p/j", map[string]any{"nixexprinput": "src", "nixexprpath": "release.nix", "enabled": 1, "visible": true, "keepnr": 3, "checkinterval": 60, "schedulingshares": 10, "inputs": map[string]any{"src": map[string]any{"type": "git", "value": "https://example.com/p.git", "emailresponsible": false}}}, asAdmin, 201)
	c.do(fa, "PUT", "/jobset/p/j", map[string]any{"nixexprinput": "src", "nixexprpath": "release.nix", "keepnr": 3}, asAdmin, 200)
	c.do(fa, "PUT", "/jobset/p/j", map[string]any{"keepnr": -1}, asAdmin, 400)
	c.do(fa, "PUT", "/jobset/nope/j", map[string]any{}, asAdmin, 404)
	c.do(fa, "PUT", "/jobset/p/j", map[string]any{}, asNobody, 401)
	c.do(fa, "PUT", "/jobset/p/tmp", map[string]any{}, asAdmin, 201)
	c.do(fa, "DELETE", "/jobset/p/tmp", nil, asWrong, 403)
	c.do(fa, "DELETE", "/jobset/p/tmp", nil, asAdmin, 200)
	c.do(fa, "DELETE", "/jobset/p/tmp", nil, asAdmin, 404)
	r = c.do(fa, "GET", "/jobset/p/j", nil, asNobody, 200)
	var hj map[string]any
	r.json(t, &hj)
	if hj["nixexprpath"] != "release.nix" || hj["schedulingshares"] != float64(1) && hj["keepnr"] != float64(3) {
		t.Errorf("jobset %v", hj)
	}
	c.do(fa, "GET", "/jobset/p/nope", nil, asNobody, 404)
	c.do(fa, "PUT", "/project/tmp", map[string]any{}, asAdmin, 201)
	c.do(fa, "DELETE", "/project/tmp", nil, asNobody, 401)
	c.do(fa, "DELETE", "/project/tmp", nil, asAdmin, 200)
	c.do(fa, "DELETE", "/project/tmp", nil, asAdmin, 404)
	c.do(fa, "GET", "/api/jobsets?project=p", nil, asNobody, 200)
	c.do(fa, "GET", "/api/jobsets", nil, asNobody, 400)
	c.do(fa, "GET", "/api/jobsets?project=nope", nil, asNobody, 404)
	c.do(fa, "POST", "/api/push?jobsets=p:j", nil, asNobody, 401)
	c.do(fa, "POST", "/api/push?jobsets=p:j", nil, asWrong, 403)
	c.do(fa, "POST", "/api/push", nil, asAdmin, 400)
	c.do(fa, "POST", "/api/push?jobsets=p:nope", nil, asAdmin, 404)
	r = c.do(fa, "POST", "/api/push?jobsets=p:j", nil, asAdmin, 200)
	if !strings.Contains(string(r.body), `"jobsetsTriggered":["p:j"]`) {
		t.Errorf("push answered %s", r.body)
	}
	if js, err := f.Read().Jobset("p", "j"); err != nil || js.TriggerTime == 0 {
		t.Errorf("push recorded no trigger: %v %v", js, err)
	}
	c.do(fa, "GET", "/jobset/p/j/latest-eval", nil, asNobody, 404)
	c.do(fa, "GET", "/jobset/p/j/evals", nil, asNobody, 200)
	c.do(fa, "GET", "/jobset/p/nope/evals", nil, asNobody, 404)

	// Native projects and jobsets.
	c.do(fa, "PUT", "/api/v1/projects/q", map[string]any{"display_name": "Q", "bogus": 1}, asAdmin, 400)
	c.do(fa, "PUT", "/api/v1/projects/q", map[string]any{"display_name": "Q"}, asNobody, 401)
	c.do(fa, "PUT", "/api/v1/projects/q", map[string]any{"display_name": "Q"}, asAdmin, 201)
	c.do(fa, "PUT", "/api/v1/projects/q", map[string]any{"display_name": "Q2"}, asAdmin, 200)
	c.do(fa, "GET", "/api/v1/projects?per_page=1", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/projects?sort=x", nil, asNobody, 400)
	c.do(fa, "GET", "/api/v1/projects/q", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/projects/zz", nil, asNobody, 404)
	c.do(fa, "PUT", "/api/v1/projects/q/jobsets/main", map[string]any{"nix_expr_path": "default.nix", "inputs": []map[string]any{{"name": "src", "type": "git", "value": "x"}}}, asAdmin, 201)
	c.do(fa, "PUT", "/api/v1/projects/q/jobsets/main", map[string]any{"nix_expr_path": "default.nix"}, asAdmin, 200)
	c.do(fa, "PUT", "/api/v1/projects/q/jobsets/main", map[string]any{"scheduling_shares": -2}, asAdmin, 400)
	c.do(fa, "PUT", "/api/v1/projects/q/jobsets/main", map[string]any{}, asWrong, 403)
	c.do(fa, "GET", "/api/v1/projects/q/jobsets", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/projects/zz/jobsets", nil, asNobody, 404)
	c.do(fa, "GET", "/api/v1/projects/q/jobsets/main", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/projects/q/jobsets/zz", nil, asNobody, 404)
	c.do(fa, "DELETE", "/api/v1/projects/q/jobsets/main", nil, asNobody, 401)
	c.do(fa, "DELETE", "/api/v1/projects/q/jobsets/main", nil, asAdmin, 204)
	c.do(fa, "DELETE", "/api/v1/projects/q/jobsets/main", nil, asAdmin, 404)
	c.do(fa, "DELETE", "/api/v1/projects/q", nil, asWrong, 403)
	c.do(fa, "DELETE", "/api/v1/projects/q", nil, asAdmin, 204)
	c.do(fa, "DELETE", "/api/v1/projects/q", nil, asAdmin, 404)

	// An agent, then an evaluation with three jobs: top (needs dep), bad
	// (will fail), and a job of its own for the restart/bump actions.
	a := registerAgent(t, fa)
	c.do(fa, "GET", "/api/v1/status/short", nil, asNobody, 200)
	evalBody := map[string]any{
		"checkout_time": 2, "eval_time": 5,
		"inputs": map[string]any{"src": map[string]string{"type": "git", "value": "https://example.com/p.git", "revision": "0123abcd", "uri": "https://example.com/p.git"}},
		"jobs": []map[string]any{
			{"job": "top", "drv_path": storePathFor("top.drv"), "graph": chainJSON("dep", "top")},
			{"job": "bad", "drv_path": storePathFor("bad.drv"), "graph": chainJSON("bad")},
		},
	}
	c.do(fa, "POST", "/api/v1/projects/p/jobsets/j/evaluations", evalBody, asNobody, 401)
	c.do(fa, "POST", "/api/v1/projects/p/jobsets/nope/evaluations", evalBody, asAdmin, 404)
	c.do(fa, "POST", "/api/v1/projects/p/jobsets/j/evaluations", map[string]any{"jobs": []map[string]any{{"job": "x", "drv_path": "/tmp/x.drv"}}}, asAdmin, 400)
	r = c.do(fa, "POST", "/api/v1/projects/p/jobsets/j/evaluations", evalBody, asAdmin, 201)
	var ev struct {
		ID     uint64   `json:"id"`
		Builds []uint64 `json:"builds"`
	}
	r.json(t, &ev)
	if len(ev.Builds) != 2 {
		t.Fatalf("evaluation %s", r.body)
	}
	topID, badID := ev.Builds[0], ev.Builds[1]
	if js, _ := f.Read().Jobset("p", "j"); js.TriggerTime != 0 {
		t.Errorf("an evaluation left the push trigger set")
	}
	// Waiting reasons before anything ran.
	r = c.do(fa, "GET", fmt.Sprintf("/api/v1/builds/%d/steps", topID), nil, asNobody, 200)
	if !strings.Contains(string(r.body), "inputs not built yet") {
		t.Errorf("steps of a waiting build: %s", r.body)
	}
	c.do(fa, "GET", "/api/v1/builds/999/steps", nil, asNobody, 404)
	r = c.do(fa, "GET", "/api/v1/steps?state=runnable", nil, asNobody, 200)
	if !strings.Contains(string(r.body), "about to be leased") {
		t.Errorf("runnable steps with a free agent: %s", r.body)
	}
	c.do(fa, "GET", "/api/v1/steps?state=sleeping", nil, asNobody, 400)
	r = c.do(fa, "GET", "/api/v1/status", nil, asNobody, 200)
	var st struct {
		AgentsKnown bool `json:"agents_known"`
		Queue       []struct {
			System      string `json:"system"`
			Runnable    int    `json:"runnable"`
			Waiting     int    `json:"waiting"`
			CanBuildNow bool   `json:"can_build_now"`
		} `json:"queue"`
		Agents []struct {
			ID   string `json:"id"`
			Live bool   `json:"live"`
		} `json:"agents"`
		Cluster struct {
			Leader       string `json:"leader"`
			Coordinators []struct {
				Reachable bool `json:"reachable"`
			} `json:"coordinators"`
		} `json:"cluster"`
	}
	r.json(t, &st)
	if !st.AgentsKnown || len(st.Agents) != 1 || !st.Agents[0].Live || len(st.Queue) != 1 || st.Queue[0].Runnable != 2 || st.Queue[0].Waiting != 1 || !st.Queue[0].CanBuildNow {
		t.Errorf("status: %s", r.body)
	}
	if len(st.Cluster.Coordinators) != 3 || st.Cluster.Leader == "" {
		t.Errorf("status cluster: %+v", st.Cluster)
	}
	for _, co := range st.Cluster.Coordinators {
		if !co.Reachable {
			t.Errorf("a coordinator is unreachable in %s", r.body)
		}
	}
	c.do(fa, "DELETE", "/api/v1/status", nil, asAdmin, 405)
	c.do(fa, "GET", "/api/v1/status?min_index=x", nil, asNobody, 400)
	c.do(fa, "GET", "/api/v1/status/short?min_index=99999999", nil, asNobody, 503)
	c.do(fa, "GET", "/api/v1/nothing-here", nil, asNobody, 404)

	// Run the work: top's chain succeeds, bad fails.
	built := map[string]bool{}
	for len(built) < 3 {
		ls, err := a.lease(5)
		if err != nil || len(ls) != 1 {
			t.Fatalf("lease: %v %v", ls, err)
		}
		lease := ls[0]
		name := strings.TrimSuffix(drvBase(lease.DrvPath)[33:], ".drv")
		if err := a.log(lease.LeaseId, "building "+name+"\n"); err != nil {
			t.Fatal(err)
		}
		if len(built) == 0 {
			// While it runs: its waiting reason and its live log.
			r := c.do(la, "GET", "/api/v1/steps/"+drvBase(lease.DrvPath), nil, asNobody, 200)
			if !strings.Contains(string(r.body), "running on agent") {
				t.Errorf("a leased step: %s", r.body)
			}
			r = c.do(fa, "GET", fmt.Sprintf("/api/v1/leases/%d/log", lease.LeaseId), nil, asNobody, 200)
			if string(r.body) != "building "+name+"\n" {
				t.Errorf("live log %q", r.body)
			}
			c.do(fa, "GET", "/api/v1/leases/1/log", nil, asNobody, 404)
			c.do(fa, "GET", "/api/v1/leases/x/log", nil, asNobody, 400)
		}
		if name == "bad" {
			if err := a.complete(lease.LeaseId, kilnv1.Outcome_OUTCOME_FAILED); err != nil {
				t.Fatal(err)
			}
		} else {
			if err := a.upload(lease.LeaseId, makeNar(t, name, nil)); err != nil {
				t.Fatal(err)
			}
			if err := a.complete(lease.LeaseId, kilnv1.Outcome_OUTCOME_SUCCEEDED); err != nil {
				t.Fatal(err)
			}
		}
		built[name] = true
	}
	tc.waitFor(10*time.Second, "both builds finished and their logs everywhere", func() bool {
		top, err1 := f.Read().Build(topID)
		bad, err2 := f.Read().Build(badID)
		_, err3 := f.Read().Log(storePathFor("top.drv"))
		_, err4 := f.Read().Log(storePathFor("bad.drv"))
		return err1 == nil && err2 == nil && err3 == nil && err4 == nil && top.StopTime != 0 && bad.StopTime != 0 &&
			f.blobs.Has(mustLog(f, "top.drv")) && f.blobs.Has(mustLog(f, "bad.drv"))
	})

	// Hydra reads.
	r = c.do(fa, "GET", fmt.Sprintf("/build/%d", topID), nil, asNobody, 200)
	var hb map[string]any
	r.json(t, &hb)
	if hb["finished"] != true || hb["buildstatus"] != float64(0) || hb["job"] != "top" || !slices.Equal(toStrings(hb["jobsetevals"]), []string{fmt.Sprint(ev.ID)}) {
		t.Errorf("hydra build: %s", r.body)
	}
	c.do(fa, "GET", "/build/999", nil, asNobody, 404)
	c.do(fa, "GET", "/build/x", nil, asNobody, 400)
	c.do(fa, "GET", fmt.Sprintf("/build/%d/constituents", topID), nil, asNobody, 200)
	c.do(fa, "GET", "/build/999/constituents", nil, asNobody, 404)
	r = c.do(fa, "GET", fmt.Sprintf("/build/%d/log", topID), nil, asNobody, 200)
	if string(r.body) != "building top\n" {
		t.Errorf("build log %q", r.body)
	}
	c.do(fa, "GET", fmt.Sprintf("/build/%d/log/raw", badID), nil, asNobody, 200)
	c.do(fa, "GET", "/build/999/log", nil, asNobody, 404)
	c.do(fa, "GET", "/build/999/log/raw", nil, asNobody, 404)
	r = c.do(fa, "GET", fmt.Sprintf("/build/%d/nixlog/2", topID), nil, asNobody, 200)
	if string(r.body) != "building dep\n" {
		t.Errorf("second step's log %q", r.body)
	}
	c.do(fa, "GET", fmt.Sprintf("/build/%d/nixlog/1/raw", topID), nil, asNobody, 200)
	c.do(fa, "GET", fmt.Sprintf("/build/%d/nixlog/3", topID), nil, asNobody, 404)
	c.do(fa, "GET", fmt.Sprintf("/build/%d/nixlog/x/raw", topID), nil, asNobody, 400)
	r = c.do(fa, "GET", fmt.Sprintf("/eval/%d", ev.ID), nil, asNobody, 200)
	if !strings.Contains(string(r.body), `"revision":"0123abcd"`) {
		t.Errorf("eval: %s", r.body)
	}
	c.do(fa, "GET", "/eval/999", nil, asNobody, 404)
	r = c.do(fa, "GET", fmt.Sprintf("/eval/%d/builds", ev.ID), nil, asNobody, 200)
	var evb []map[string]any
	r.json(t, &evb)
	if len(evb) != 2 {
		t.Errorf("eval builds: %s", r.body)
	}
	c.do(fa, "GET", "/eval/999/builds", nil, asNobody, 404)
	r = c.do(fa, "GET", "/jobset/p/j/latest-eval", nil, asNobody, 302)
	if loc := r.header.Get("Location"); loc != fmt.Sprintf("/eval/%d?name=j", ev.ID) {
		t.Errorf("latest-eval redirects to %q", loc)
	}
	r = c.do(fa, "GET", "/jobset/p/j/evals", nil, asNobody, 200)
	if !strings.Contains(string(r.body), `"first":"?page=1"`) {
		t.Errorf("evals: %s", r.body)
	}
	c.do(fa, "GET", "/jobset/p/j/evals?page=0", nil, asNobody, 400)
	for _, p := range []string{"latest", "latest-for/x86_64-linux", "latest-finished"} {
		r = c.do(fa, "GET", "/job/p/j/top/"+p, nil, asNobody, 302)
		if loc := r.header.Get("Location"); loc != fmt.Sprintf("/build/%d", topID) {
			t.Errorf("%s redirects to %q", p, loc)
		}
		c.do(fa, "GET", "/job/p/j/bad/"+p, nil, asNobody, 404)
	}
	c.do(fa, "GET", "/job/p/j/top/latest-for/aarch64-linux", nil, asNobody, 404)
	r = c.do(fa, "GET", "/job/p/j/top/shield", nil, asNobody, 200)
	if !strings.Contains(string(r.body), `"message":"passing"`) {
		t.Errorf("shield %s", r.body)
	}
	r = c.do(fa, "GET", "/job/p/j/bad/shield", nil, asNobody, 200)
	if !strings.Contains(string(r.body), `"color":"red"`) {
		t.Errorf("shield of a failed job %s", r.body)
	}
	c.do(fa, "GET", "/job/p/j/nope/shield", nil, asNobody, 404)
	r = c.do(fa, "GET", "/search?query=TOP", nil, asNobody, 200)
	if !strings.Contains(string(r.body), `"job":"top"`) {
		t.Errorf("search: %s", r.body)
	}
	c.do(fa, "GET", "/search?query="+url.QueryEscape(storePathFor("bad.drv")), nil, asNobody, 200)
	c.do(fa, "GET", "/search?query=", nil, asNobody, 400)
	c.do(fa, "GET", "/api/jobsets?project=p", nil, asNobody, 200)

	// Native reads.
	r = c.do(fa, "GET", "/api/v1/builds?project=p&jobset=j&status=failed", nil, asNobody, 200)
	var list struct {
		Items []struct {
			ID uint64 `json:"id"`
		} `json:"items"`
		Meta struct {
			Total int `json:"total"`
		} `json:"meta"`
	}
	r.json(t, &list)
	if list.Meta.Total != 1 || list.Items[0].ID != badID {
		t.Errorf("failed builds: %s", r.body)
	}
	c.do(fa, "GET", "/api/v1/builds?finished=true&system=x86_64-linux&per_page=1&page=2", nil, asNobody, 200)
	r = c.do(fa, "GET", "/api/v1/builds?status=broken", nil, asNobody, 400)
	if !strings.Contains(string(r.body), "dependency-failed") {
		t.Errorf("a bad status filter does not name the valid ones: %s", r.body)
	}
	c.do(fa, "GET", "/api/v1/builds?colour=red", nil, asNobody, 400)
	c.do(fa, "GET", fmt.Sprintf("/api/v1/builds/%d", topID), nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/builds/0", nil, asNobody, 400)
	c.do(fa, "GET", "/api/v1/builds/999", nil, asNobody, 404)
	c.do(fa, "GET", fmt.Sprintf("/api/v1/builds/%d/log", topID), nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/builds/999/log", nil, asNobody, 404)
	c.do(fa, "GET", "/api/v1/evaluations?project=p&jobset=j", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/evaluations?jobset=j", nil, asNobody, 400)
	c.do(fa, "GET", fmt.Sprintf("/api/v1/evaluations/%d", ev.ID), nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/evaluations/999", nil, asNobody, 404)
	c.do(fa, "GET", "/api/v1/steps", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/steps/"+drvBase(storePathFor("top.drv")), nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/steps/not-a-drv", nil, asNobody, 400)
	c.do(fa, "GET", "/api/v1/steps/"+drvBase(storePathFor("none.drv")), nil, asNobody, 404)
	c.do(fa, "GET", "/api/v1/steps/"+drvBase(storePathFor("bad.drv"))+"/logs", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/steps/"+drvBase(storePathFor("none.drv"))+"/logs", nil, asNobody, 404)
	c.do(fa, "GET", "/api/v1/steps/"+drvBase(storePathFor("bad.drv"))+"/logs/1", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/steps/"+drvBase(storePathFor("bad.drv"))+"/logs/7", nil, asNobody, 404)
	c.do(fa, "GET", "/api/v1/cluster", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/cluster?min_index=x", nil, asNobody, 400)
	c.do(fa, "GET", "/api/v1/openapi.yaml", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/hydra-openapi.yaml", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/openapi.yaml?min_index=x", nil, asNobody, 400)
	c.do(fa, "GET", "/api/v1/hydra-openapi.yaml?min_index=x", nil, asNobody, 400)
	c.do(fa, "POST", "/api/v1/cache/scrub", nil, asNobody, 401)
	c.do(fa, "POST", "/api/v1/cache/scrub", nil, asAdmin, 200)
	c.do(fa, "GET", "/api/v1/cache/scrub", nil, asNobody, 200)
	c.do(fa, "GET", "/api/v1/cache/scrub?min_index=x", nil, asNobody, 400)

	// Self-serve actions.
	c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/restart", badID), nil, asSession, 403) // alice may not restart
	c.do(fa, "POST", "/api/v1/builds/999/restart", nil, asAdmin, 404)
	r = c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/restart", badID), nil, asAdmin, 202)
	if !strings.Contains(string(r.body), `"finished":false`) || !strings.Contains(string(r.body), `"restarts":1`) {
		t.Errorf("restart: %s", r.body)
	}
	c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/restart", badID), nil, asAdmin, 409)
	c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/bump", badID), nil, asNobody, 401)
	c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/bump", badID), nil, asAdmin, 202)
	c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/bump", topID), nil, asAdmin, 409)
	c.do(fa, "PUT", fmt.Sprintf("/api/v1/builds/%d/priority", badID), map[string]any{"priority": "high"}, asAdmin, 400)
	c.do(fa, "PUT", fmt.Sprintf("/api/v1/builds/%d/priority", badID), map[string]any{}, asAdmin, 400)
	r = c.do(fa, "PUT", fmt.Sprintf("/api/v1/builds/%d/priority", badID), map[string]any{"priority": 50}, asAdmin, 202)
	if !strings.Contains(string(r.body), `"priority":50`) {
		t.Errorf("priority: %s", r.body)
	}
	if s, _ := f.Read().Step(storePathFor("bad.drv")); s.Priority != 50 || s.GlobalPriority == 0 {
		t.Errorf("the step did not take the build's priority and bump: %v", s)
	}
	c.do(fa, "PUT", fmt.Sprintf("/api/v1/builds/%d/priority", topID), map[string]any{"priority": 1}, asAdmin, 409)
	c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/cancel", badID), `{"reason": 3}`, asSession, 400)
	r = c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/cancel", badID), map[string]string{"reason": "not needed"}, asSession, 202)
	if !strings.Contains(string(r.body), `"buildstatus":4`) {
		t.Errorf("cancel: %s", r.body)
	}
	c.do(fa, "POST", fmt.Sprintf("/api/v1/builds/%d/cancel", badID), nil, asSession, 409)
	c.do(fa, "POST", "/api/v1/builds/999/cancel", nil, asSession, 404)
	// The first attempt's log survives the restart.
	r = c.do(fa, "GET", "/api/v1/steps/"+drvBase(storePathFor("bad.drv"))+"/logs", nil, asNobody, 200)
	if !strings.Contains(string(r.body), `"attempt":1`) {
		t.Errorf("logs after restart: %s", r.body)
	}
	// A second evaluation: top is reused, a new job is queued, and the
	// evaluation is cancelled.
	evalBody["jobs"] = []map[string]any{
		{"job": "top", "drv_path": storePathFor("top.drv"), "graph": chainJSON("dep", "top")},
		{"job": "later", "drv_path": storePathFor("later.drv"), "graph": chainJSON("later")},
	}
	r = c.do(fa, "POST", "/api/v1/projects/p/jobsets/j/evaluations", evalBody, asAdmin, 201)
	var ev2 struct {
		ID     uint64   `json:"id"`
		Builds []uint64 `json:"builds"`
	}
	r.json(t, &ev2)
	if len(ev2.Builds) != 2 || ev2.Builds[0] != topID {
		t.Errorf("second evaluation did not reuse build %d: %s", topID, r.body)
	}
	c.do(fa, "POST", fmt.Sprintf("/api/v1/evaluations/%d/cancel", ev2.ID), nil, asNobody, 401)
	c.do(fa, "POST", "/api/v1/evaluations/999/cancel", nil, asAdmin, 404)
	c.do(fa, "POST", fmt.Sprintf("/api/v1/evaluations/%d/cancel", ev2.ID), nil, asSession, 202)
	c.do(fa, "POST", fmt.Sprintf("/api/v1/evaluations/%d/cancel", ev2.ID), nil, asAdmin, 409)
	r = c.do(fa, "GET", fmt.Sprintf("/build/%d", topID), nil, asNobody, 200)
	r.json(t, &hb)
	if !slices.Equal(toStrings(hb["jobsetevals"]), []string{fmt.Sprint(ev.ID), fmt.Sprint(ev2.ID)}) {
		t.Errorf("reused build's evaluations: %v", hb["jobsetevals"])
	}
	// Submissions through /api/v1.
	c.do(fa, "POST", "/api/v1/builds", map[string]any{"drv_path": storePathFor("solo.drv"), "graph": chainJSON("solo")}, asSession, 403)
	c.do(fa, "POST", "/api/v1/builds", map[string]any{"drv_path": storePathFor("solo.drv")}, asAdmin, 400)
	c.do(fa, "POST", "/api/v1/builds", map[string]any{"drv_path": storePathFor("solo.drv"), "graph": chainJSON("solo")}, asAdmin, 201)

	// Unknown routes and methods, anywhere.
	c.do(fa, "GET", "/no/such/page", nil, asNobody, 404)
	c.do(fa, "PATCH", "/project/p", nil, asAdmin, 405)
	c.do(fa, "GET", "/api/v1/users?min_index=x", nil, asAdmin, 400)
	c.do(fa, "DELETE", "/api/v1/users/alice?min_index=x", nil, asAdmin, 400)

	for _, d := range []struct {
		name string
		data []byte
	}{{"Hydra", openapi.HydraYAML()}, {"Kiln", openapi.KilnYAML()}} {
		if miss := c.missingCoverage(d.data); len(miss) > 0 {
			t.Errorf("%s operations never checked:\n  %s", d.name, strings.Join(miss, "\n  "))
		}
	}
}

func mustLog(c *Coordinator, name string) string {
	l, err := c.Read().Log(storePathFor(name))
	if err != nil {
		return ""
	}
	return l.Blob
}

func toStrings(v any) []string {
	var out []string
	if xs, ok := v.([]any); ok {
		for _, x := range xs {
			out = append(out, fmt.Sprint(x))
		}
	}
	return out
}
