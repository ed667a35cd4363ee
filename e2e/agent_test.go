package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const agentToken = "e2e-agent-join-token-0123456789"

const graphExpr = `
let
  nonce = "NONCE";
  mkWith = extra: name: deps: script: derivation ({
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    deps = deps;
    args = [ "-c" ("echo building ${name} $nonce; " + script + " mkdir -p $out; for d in $deps; do echo $d >> $out/deps; done; echo ${name} > $out/name") ];
  } // extra);
  mk = mkWith { };
in rec {
  d1 = mk "diamond-root" [ ] "";
  d2 = mk "diamond-left" [ d1 ] "echo left side;";
  d3 = mk "diamond-right" [ d1 ] "echo right side >&2;";
  d4 = mk "diamond-top" [ d2 d3 ] "";
  c1 = mk "chain-1" [ ] "";
  c2 = mk "chain-2" [ c1 ] "";
  c3 = mk "chain-3" [ c2 ] "";
  big = mkWith { requiredSystemFeatures = [ "big" ]; } "needs-big" [ ] "echo a big build;";
  fail = mk "fails" [ ] "echo about to fail; exit 1;";
  afterFail = mk "after-fail" [ fail ] "";
}`

// showDerivations returns the derivation graph of drvs (recursively) as
// the API's graph entries, from `nix show-derivation -r`.
func showDerivations(t *testing.T, nx *nixEnv, store string, drvs ...string) []map[string]any {
	t.Helper()
	out := nx.must("nix", append([]string{"show-derivation", "--store", nx.store(store), "-r"}, drvs...)...)
	var shown map[string]struct {
		Outputs   map[string]struct{ Path string } `json:"outputs"`
		InputDrvs map[string][]string              `json:"inputDrvs"`
		System    string                           `json:"system"`
		Env       map[string]string                `json:"env"`
	}
	if err := json.Unmarshal([]byte(out), &shown); err != nil {
		t.Fatal(err)
	}
	var graph []map[string]any
	for drv, d := range shown {
		outs := map[string]string{}
		for name, o := range d.Outputs {
			outs[name] = o.Path
		}
		var ins []string
		for in := range d.InputDrvs {
			ins = append(ins, in)
		}
		slices.Sort(ins)
		g := map[string]any{"drv_path": drv, "system": d.System, "outputs": outs, "input_drvs": ins}
		if f := strings.Fields(d.Env["requiredSystemFeatures"]); len(f) > 0 {
			g["required_features"] = f
		}
		graph = append(graph, g)
	}
	return graph
}

type buildView struct {
	ID          uint64            `json:"id"`
	Finished    bool              `json:"finished"`
	BuildStatus *int32            `json:"buildstatus"`
	Outputs     map[string]string `json:"outputs"`
}

// TestAgentsBuildGraph: three coordinators and two agents with their own
// chroot stores build a diamond, a chain, a derivation needing a feature
// only agent B has, and a failing derivation with a dependent, submitted
// through a follower. Outputs land in the cache and substitute with
// signatures required; the failure is status 1 and its dependent 2; every
// step's log equals what Nix recorded.
func TestAgentsBuildGraph(t *testing.T) {
	nx := newNixEnv(t)
	dir := t.TempDir()
	secret, public := filepath.Join(dir, "cache.sec"), filepath.Join(dir, "cache.pub")
	if out, err := exec.Command(kilnBin, "keygen", "e2e-agents-1", "--secret-file", secret, "--public-file", public).CombinedOutput(); err != nil {
		t.Fatalf("keygen: %v\n%s", err, out)
	}
	pub, _ := os.ReadFile(public)
	key := strings.TrimSpace(string(pub))
	agentTokenFile := filepath.Join(dir, "agent-token")
	if err := os.WriteFile(agentTokenFile, []byte(agentToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	nodes := startCoordinators(t, 3, func(int) []string {
		return []string{"--cache-key-file", secret, "--agent-token-file", agentTokenFile, "--lease-ttl", "5s",
			"--retry-backoff", "1s", "--blob-sync-interval", "1s"}
	})
	li := leaderOf(nodes)
	f1, f2 := nodes[(li+1)%3], nodes[(li+2)%3]
	startAgent := func(name string, via *coordProc, features string) *proc {
		p := startProc(t, name, "agent", "--coordinator", "http://"+via.http, "--token-file", agentTokenFile,
			"--work-dir", filepath.Join(dir, name), "--store", filepath.Join(dir, name+"-store"),
			"--systems", currentSystem(t, nx), "--features="+features, "--max-jobs", "2",
			"--nix-option", "sandbox-paths=/bin/sh=/bin/busybox", "--heartbeat-interval", "1s")
		t.Cleanup(func() {
			if t.Failed() {
				p.dumpLog()
			}
		})
		return p
	}
	startAgent("agentA", f1, "benchmark")
	startAgent("agentB", f2, "benchmark,big")

	// Evaluate, push the derivations to the cache, submit through a follower.
	expr := strings.ReplaceAll(graphExpr, "NONCE", fmt.Sprint(time.Now().UnixNano()))
	file := filepath.Join(nx.dir, "graph.nix")
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	tops := []string{"d4", "c3", "big", "fail", "afterFail"}
	drvs := map[string]string{}
	for _, attr := range tops {
		drvs[attr] = strings.TrimSpace(nx.must("nix-instantiate", "--store", nx.store("src"), "--option", "substituters", "", file, "-A", attr))
	}
	netrc := filepath.Join(nx.dir, "netrc")
	if err := os.WriteFile(netrc, []byte("machine 127.0.0.1\nlogin nix\npassword "+token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var allDrvs []string
	for _, d := range drvs {
		allDrvs = append(allDrvs, d)
	}
	nx.must("nix", append([]string{"copy", "--derivation", "--store", nx.store("src"), "--option", "substituters", "", "--option", "netrc-file", netrc,
		"--to", "http://" + f1.http + "/cache?compression=zstd"}, allDrvs...)...)
	ids := map[string]uint64{}
	for _, attr := range tops {
		body := map[string]any{"drv_path": drvs[attr], "project": "e2e", "jobset": "agents", "job": attr,
			"graph": showDerivations(t, nx, "src", drvs[attr])}
		var out buildView
		code, err := postJSON("http://"+f1.http+"/api/v1/builds", token, body, &out)
		if err != nil || code != http.StatusCreated {
			t.Fatalf("submit %s: %d %v", attr, code, err)
		}
		ids[attr] = out.ID
	}
	results := map[string]buildView{}
	waitFor(t, 120*time.Second, "every build finished", func() bool {
		for attr, id := range ids {
			var b buildView
			if code, err := getJSON(fmt.Sprintf("http://%s/api/v1/builds/%d", f2.http, id), &b); err != nil || code != 200 || !b.Finished {
				return false
			}
			results[attr] = b
		}
		return true
	})
	wantStatus := map[string]int32{"d4": 0, "c3": 0, "big": 0, "fail": 1, "afterFail": 2}
	for attr, want := range wantStatus {
		if b := results[attr]; b.BuildStatus == nil || *b.BuildStatus != want {
			t.Errorf("build %s: status %v, want %d", attr, b.BuildStatus, want)
		}
	}

	// Outputs substitute from the cache with signatures required.
	var outs []string
	for _, attr := range []string{"d4", "c3", "big"} {
		for _, p := range results[attr].Outputs {
			outs = append(outs, p)
		}
	}
	args := append([]string{"--store", nx.store("check"), "--option", "substituters", "http://" + nodes[li].http + "/cache",
		"--option", "trusted-public-keys", key, "--option", "require-sigs", "true", "-r"}, outs...)
	nx.must("nix-store", args...)
	for _, p := range outs {
		if got := strings.TrimSpace(nx.must("nix-store", "--store", nx.store("check"), "--verify-path", p)); got != "" {
			t.Errorf("verify %s: %s", p, got)
		}
	}

	// The big step ran on agent B; every step that ran has its log in the
	// cache, equal to what Nix recorded in the agent's store.
	graph := showDerivations(t, nx, "src", allDrvs...)
	for _, g := range graph {
		drv := g["drv_path"].(string)
		if strings.HasSuffix(drv, "-after-fail.drv") {
			continue // never ran
		}
		var recorded []byte
		var builtBy string
		for _, ag := range []string{"agentA", "agentB"} {
			cmd := exec.Command("nix-store", "--store", filepath.Join(dir, ag+"-store"), "--read-log", drv)
			cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(nx.dir, "xdg-log"))
			if out, err := cmd.Output(); err == nil {
				recorded, builtBy = out, ag
			}
		}
		if builtBy == "" {
			t.Errorf("no agent store has a log of %s", drv)
			continue
		}
		if strings.HasSuffix(drv, "-needs-big.drv") && builtBy != "agentB" {
			t.Errorf("%s was built by %s, only agentB has the feature", drv, builtBy)
		}
		resp, err := client.Get("http://" + f2.http + "/cache/log/" + strings.TrimPrefix(drv, "/nix/store/"))
		if err != nil {
			t.Fatal(err)
		}
		stored := readAll(t, resp)
		if resp.StatusCode != 200 || stored != string(recorded) {
			t.Errorf("log of %s: status %d, %q; want %q", drv, resp.StatusCode, stored, recorded)
		}
	}
}

func currentSystem(t *testing.T, nx *nixEnv) string {
	t.Helper()
	return strings.Trim(strings.TrimSpace(nx.must("nix-instantiate", "--eval", "--expr", "builtins.currentSystem", "--option", "substituters", "")), `"`)
}

func readAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	var sb strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil || sb.Len() > 16<<20 {
			break
		}
	}
	return sb.String()
}
