package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// hydraClient behaves as Hydra's clients do: a cookie jar for the login
// session, Accept: application/json, redirects followed.
type hydraClient struct {
	t    *testing.T
	base string
	hc   *http.Client
}

func newHydraClient(t *testing.T, base string) *hydraClient {
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &hydraClient{t: t, base: base, hc: &http.Client{Jar: jar, Timeout: 10 * time.Second}}
}

func (h *hydraClient) call(method, path string, body any, out any) (int, string) {
	h.t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			h.t.Fatal(err)
		}
		rd = strings.NewReader(string(b))
	}
	req, err := http.NewRequest(method, h.base+path, rd)
	if err != nil {
		h.t.Fatal(err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := h.hc.Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			h.t.Fatalf("%s %s: %v in %s", method, path, err, b)
		}
	}
	return resp.StatusCode, string(b)
}

// hydraBuildJSON is the part of Hydra's build a client reads.
type hydraBuildJSON struct {
	ID           uint64                       `json:"id"`
	Finished     bool                         `json:"finished"`
	BuildStatus  *int                         `json:"buildstatus"`
	Job          string                       `json:"job"`
	Jobset       string                       `json:"jobset"`
	Project      string                       `json:"project"`
	DrvPath      string                       `json:"drvpath"`
	System       string                       `json:"system"`
	JobsetEvals  []uint64                     `json:"jobsetevals"`
	BuildOutputs map[string]map[string]string `json:"buildoutputs"`
}

const hydraJobsExpr = `
let
  nonce = "NONCE";
  mk = name: script: derivation {
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ("echo building ${name}; " + script) ];
  };
in {
  hello = mk "hello" "mkdir -p $out; echo hello > $out/greeting";
  broken = mk "broken" "echo this one fails; exit 1";
}`

// TestHydraClient: a Hydra client logs in, creates a project and jobset
// on Hydra's paths, an evaluation is recorded (`kiln build --eval`) and
// built by a real agent with real Nix, and the client asks what Hydra
// clients ask: the latest build of a job, a build, the latest evaluation
// and its builds, a shield, the jobset overview, a push.
func TestHydraClient(t *testing.T) {
	fm := startFarm(t)
	f1, f2, _ := fm.followers()
	fm.startAgent("agentA", f1, "")
	adminFile := filepath.Join(fm.dir, "admin-token")
	if err := os.WriteFile(adminFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The operator makes a user for the CI.
	code, err := putJSON("http://"+f2.http+"/api/v1/users/ci", token, map[string]any{
		"fullname": "CI bot", "emailaddress": "ci@example.com", "userroles": []string{"create-projects", "eval-jobset"}, "password": "ci password 1"})
	if err != nil || code != http.StatusOK {
		t.Fatalf("create user: %d %v", code, err)
	}

	h := newHydraClient(t, "http://"+f1.http)
	var me map[string]any
	if code, body := h.call("POST", "/login", map[string]string{"username": "ci", "password": "ci password 1"}, &me); code != 200 {
		t.Fatalf("login: %d %s", code, body)
	}
	if me["username"] != "ci" || me["fullname"] != "CI bot" {
		t.Errorf("login answered %v", me)
	}
	if code, body := h.call("PUT", "/project/demo", map[string]any{"name": "demo", "displayname": "Demo", "description": "e2e", "enabled": "1", "visible": "1", "owner": "ci"}, nil); code != 201 {
		t.Fatalf("create project: %d %s", code, body)
	}
	if code, body := h.call("PUT", "/jobset/demo/main", map[string]any{"enabled": 1, "visible": true, "nixexprinput": "src", "nixexprpath": "default.nix",
		"checkinterval": 0, "schedulingshares": 100, "keepnr": 3, "inputs": map[string]any{"src": map[string]any{"type": "path", "value": "/src"}}}, nil); code != 201 {
		t.Fatalf("create jobset: %d %s", code, body)
	}

	// An evaluation of two jobs, built on the farm.
	file := filepath.Join(fm.dir, "jobs.nix")
	if err := os.WriteFile(file, []byte(strings.ReplaceAll(hydraJobsExpr, "NONCE", fmt.Sprint(time.Now().UnixNano()))), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(kilnBin, "build", "--eval", "--project", "demo", "--jobset", "main", "-f", file, "-A", "hello", "-A", "broken",
		"--coordinator", "http://"+f2.http, "--token-file", adminFile, "--store", fm.nx.store("src"), "--timeout", "2m")
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(fm.dir, "xdg-eval"))
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "1 of 2 builds failed") || !strings.Contains(string(out), "evaluation 1 of demo:main: 2 builds") {
		t.Fatalf("kiln build --eval: %v\n%s", err, out)
	}

	// The latest successful build of a job (redirect followed).
	// (Polled, as a client does: this node may apply the last completion
	// a moment after the node kiln build asked.)
	var latest hydraBuildJSON
	waitFor(t, 10*time.Second, "the latest build of hello", func() bool {
		code, _ := h.call("GET", "/job/demo/main/hello/latest", nil, &latest)
		return code == 200
	})
	outPath := latest.BuildOutputs["out"]["path"]
	want := hydraBuildJSON{ID: latest.ID, Finished: true, BuildStatus: new(int), Job: "hello", Jobset: "main", Project: "demo",
		DrvPath: latest.DrvPath, System: fm.system, JobsetEvals: []uint64{1}, BuildOutputs: map[string]map[string]string{"out": {"path": outPath}}}
	if diff := cmp.Diff(want, latest); diff != "" || !strings.HasSuffix(outPath, "-hello") || !strings.HasSuffix(latest.DrvPath, "-hello.drv") {
		t.Errorf("latest build (-want +got):\n%s", diff)
	}
	// The same build by id, from another node.
	var byID hydraBuildJSON
	if code, body := newHydraClient(t, "http://"+f2.http).call("GET", fmt.Sprintf("/build/%d", latest.ID), nil, &byID); code != 200 {
		t.Fatalf("build: %d %s", code, body)
	}
	if diff := cmp.Diff(latest, byID); diff != "" {
		t.Errorf("build by id differs (-latest +byid):\n%s", diff)
	}
	// Its output is in the cluster cache.
	if code, _ := h.call("GET", "/cache/"+strings.TrimPrefix(outPath, "/nix/store/")[:32]+".narinfo", nil, nil); code != 200 {
		t.Errorf("narinfo of the latest output: %d", code)
	}
	// The latest evaluation and its builds.
	var ev struct {
		ID     uint64   `json:"id"`
		Builds []uint64 `json:"builds"`
	}
	if code, body := h.call("GET", "/jobset/demo/main/latest-eval", nil, &ev); code != 200 || ev.ID != 1 || len(ev.Builds) != 2 {
		t.Fatalf("latest-eval: %d %s", code, body)
	}
	var builds []hydraBuildJSON
	if code, body := h.call("GET", fmt.Sprintf("/eval/%d/builds", ev.ID), nil, &builds); code != 200 || len(builds) != 2 {
		t.Fatalf("eval builds: %d %s", code, body)
	}
	status := map[string]int{}
	for _, b := range builds {
		if b.BuildStatus == nil || !b.Finished {
			t.Errorf("build %d of a finished evaluation: %+v", b.ID, b)
			continue
		}
		status[b.Job] = *b.BuildStatus
	}
	if diff := cmp.Diff(map[string]int{"hello": 0, "broken": 1}, status); diff != "" {
		t.Errorf("statuses (-want +got):\n%s", diff)
	}
	// Shields.
	for job, want := range map[string]map[string]any{
		"hello":  {"schemaVersion": float64(1), "label": "hydra build", "message": "passing", "color": "green"},
		"broken": {"schemaVersion": float64(1), "label": "hydra build", "message": "failed", "color": "red"},
	} {
		var got map[string]any
		if code, body := h.call("GET", "/job/demo/main/"+job+"/shield", nil, &got); code != 200 {
			t.Fatalf("shield %s: %d %s", job, code, body)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("shield of %s (-want +got):\n%s", job, diff)
		}
	}
	if code, _ := h.call("GET", "/job/demo/main/broken/latest", nil, nil); code != 404 {
		t.Errorf("latest of a job that never succeeded: %d, want 404", code)
	}
	// The jobset overview counts the latest evaluation.
	var overview []map[string]any
	if code, body := h.call("GET", "/api/jobsets?project=demo", nil, &overview); code != 200 || len(overview) != 1 ||
		overview[0]["nrtotal"] != float64(2) || overview[0]["nrfailed"] != float64(1) || overview[0]["nrscheduled"] != float64(0) {
		t.Errorf("jobset overview: %d %s", code, body)
	}
	// A push trigger, with the session.
	var pushed map[string][]string
	if code, body := h.call("POST", "/api/push?jobsets=demo:main", nil, &pushed); code != 200 || !cmp.Equal(pushed["jobsetsTriggered"], []string{"demo:main"}) {
		t.Errorf("push: %d %s", code, body)
	}
	var js map[string]any
	if code, _ := h.call("GET", "/jobset/demo/main", nil, &js); code != 200 || js["triggertime"] == nil {
		t.Errorf("jobset after push: %v", js)
	}
	// The build log, as text.
	if code, body := h.call("GET", fmt.Sprintf("/build/%d/log", latest.ID), nil, nil); code != 200 || !strings.Contains(body, "building hello") {
		t.Errorf("build log: %d %q", code, body)
	}
}

func putJSON(url, tok string, body any) (int, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequest(http.MethodPut, url, strings.NewReader(string(b)))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}
