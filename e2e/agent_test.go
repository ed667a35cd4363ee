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
  big = mkWith { requiredSystemFeatures = [ "big" ]; } "needs-big" [ ] "echo a big build; mkdir -p $out; head -c 9437184 /dev/urandom > $out/big;";
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

// farm is a three-coordinator cluster with a cache key and an agent join
// token, plus what is needed to start agents and push derivations.
type farm struct {
	t         *testing.T
	nx        *nixEnv
	dir       string
	key       string
	tokenFile string
	nodes     []*coordProc
	netrc     string
	system    string
}

func startFarm(t *testing.T, extra ...string) *farm {
	t.Helper()
	return startFarmWith(t, func(int) []string { return extra })
}

// startFarmWith is startFarm with per-node extra coordinator arguments.
func startFarmWith(t *testing.T, extra func(i int) []string) *farm {
	t.Helper()
	fm := &farm{t: t, nx: newNixEnv(t), dir: t.TempDir()}
	secret, public := filepath.Join(fm.dir, "cache.sec"), filepath.Join(fm.dir, "cache.pub")
	if out, err := exec.Command(kilnBin, "keygen", "e2e-agents-1", "--secret-file", secret, "--public-file", public).CombinedOutput(); err != nil {
		t.Fatalf("keygen: %v\n%s", err, out)
	}
	pub, _ := os.ReadFile(public)
	fm.key = strings.TrimSpace(string(pub))
	fm.tokenFile = filepath.Join(fm.dir, "agent-token")
	if err := os.WriteFile(fm.tokenFile, []byte(agentToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fm.nodes = startCoordinators(t, 3, func(i int) []string {
		return append([]string{"--cache-key-file", secret, "--agent-token-file", fm.tokenFile, "--lease-ttl", "4s",
			"--retry-backoff", "1s", "--blob-sync-interval", "1s"}, extra(i)...)
	})
	fm.netrc = filepath.Join(fm.nx.dir, "netrc")
	if err := os.WriteFile(fm.netrc, []byte("machine 127.0.0.1\nlogin nix\npassword "+token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fm.system = currentSystem(t, fm.nx)
	return fm
}

// followers returns the two nodes that do not lead, and the leader's index.
func (fm *farm) followers() (*coordProc, *coordProc, int) {
	li := leaderOf(fm.nodes)
	if li < 0 {
		fm.t.Fatal("no leader")
	}
	return fm.nodes[(li+1)%3], fm.nodes[(li+2)%3], li
}

func (fm *farm) startAgent(name string, via *coordProc, features string, extra ...string) *proc {
	p := startProc(fm.t, name, append([]string{"agent", "--coordinator", "http://" + via.http, "--token-file", fm.tokenFile,
		"--work-dir", filepath.Join(fm.dir, name), "--store", filepath.Join(fm.dir, name+"-store"),
		"--systems", fm.system, "--features=" + features, "--max-jobs", "2",
		"--nix-option", "sandbox-paths=/bin/sh=/bin/busybox", "--heartbeat-interval", "1s"}, extra...)...)
	fm.t.Cleanup(func() {
		if fm.t.Failed() {
			p.dumpLog()
		}
	})
	return p
}

// submit instantiates attrs of expr, pushes their derivations through
// node and submits one build per attribute; it returns build IDs and drvs.
func (fm *farm) submit(node *coordProc, expr string, attrs ...string) (map[string]uint64, map[string]string) {
	fm.t.Helper()
	nx := fm.nx
	file := filepath.Join(nx.dir, fmt.Sprintf("expr-%d.nix", nx.n))
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		fm.t.Fatal(err)
	}
	drvs := map[string]string{}
	var all []string
	for _, attr := range attrs {
		drvs[attr] = strings.TrimSpace(nx.must("nix-instantiate", "--store", nx.store("src"), "--option", "substituters", "", file, "-A", attr))
		all = append(all, drvs[attr])
	}
	nx.must("nix", append([]string{"copy", "--derivation", "--store", nx.store("src"), "--option", "substituters", "", "--option", "netrc-file", fm.netrc,
		"--to", "http://" + node.http + "/cache?compression=zstd"}, all...)...)
	ids := map[string]uint64{}
	for _, attr := range attrs {
		body := map[string]any{"drv_path": drvs[attr], "project": "e2e", "jobset": "agents", "job": attr,
			"graph": showDerivations(fm.t, nx, "src", drvs[attr])}
		var out buildView
		code, err := postJSON("http://"+node.http+"/api/v1/builds", token, body, &out)
		if err != nil || code != http.StatusCreated {
			fm.t.Fatalf("submit %s: %d %v", attr, code, err)
		}
		ids[attr] = out.ID
	}
	return ids, drvs
}

// waitFinished waits for builds to finish as node sees them.
func (fm *farm) waitFinished(node *coordProc, timeout time.Duration, ids map[string]uint64) map[string]buildView {
	fm.t.Helper()
	results := map[string]buildView{}
	waitFor(fm.t, timeout, "every build finished", func() bool {
		for attr, id := range ids {
			var b buildView
			if code, err := getJSON(fmt.Sprintf("http://%s/api/v1/builds/%d", node.http, id), &b); err != nil || code != 200 || !b.Finished {
				return false
			}
			results[attr] = b
		}
		return true
	})
	return results
}

// recordedLog is the log Nix recorded for drv in an agent's store.
func (fm *farm) recordedLog(agentName, drv string) ([]byte, error) {
	cmd := exec.Command("nix-store", "--store", filepath.Join(fm.dir, agentName+"-store"), "--read-log", drv)
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(fm.nx.dir, "xdg-log"))
	return cmd.Output()
}

// storedLog is the log a coordinator serves for drv.
func (fm *farm) storedLog(node *coordProc, drv string) (int, string) {
	fm.t.Helper()
	resp, err := client.Get("http://" + node.http + "/cache/log/" + strings.TrimPrefix(drv, "/nix/store/"))
	if err != nil {
		fm.t.Fatal(err)
	}
	return resp.StatusCode, readAll(fm.t, resp)
}

// TestAgentsBuildGraph: three coordinators and two agents with their own
// chroot stores build a diamond, a chain, a derivation needing a feature
// only agent B has, and a failing derivation with a dependent, submitted
// through a follower. Outputs land in the cache and substitute with
// signatures required (the big one's NAR is 480 bytes over nine times
// agent.FrameSize, so its agent sent it as ten zstd frames); the failure
// is status 1 and its dependent 2; every step's log equals what Nix
// recorded.
func TestAgentsBuildGraph(t *testing.T) {
	fm := startFarm(t)
	nx := fm.nx
	f1, f2, li := fm.followers()
	nodes := fm.nodes
	fm.startAgent("agentA", f1, "benchmark")
	fm.startAgent("agentB", f2, "benchmark,big")
	key := fm.key
	// Evaluate, push the derivations to the cache, submit through a follower.
	expr := strings.ReplaceAll(graphExpr, "NONCE", fmt.Sprint(time.Now().UnixNano()))
	tops := []string{"d4", "c3", "big", "fail", "afterFail"}
	ids, drvs := fm.submit(f1, expr, tops...)
	var allDrvs []string
	for _, d := range drvs {
		allDrvs = append(allDrvs, d)
	}
	results := fm.waitFinished(f2, 120*time.Second, ids)
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
			if out, err := fm.recordedLog(ag, drv); err == nil {
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
		if code, stored := fm.storedLog(f2, drv); code != 200 || stored != string(recorded) {
			t.Errorf("log of %s: status %d, %q; want %q", drv, code, stored, recorded)
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

// TestKilnBuild: `kiln build -f FILE -A ATTR` evaluates locally, pushes
// the derivations, builds on the farm and prints the outputs; a failing
// build exits non-zero with the failing step and its log's tail.
func TestKilnBuild(t *testing.T) {
	fm := startFarm(t)
	f1, _, _ := fm.followers()
	fm.startAgent("agentA", f1, "benchmark")
	tokenFile := filepath.Join(fm.dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	expr := strings.ReplaceAll(graphExpr, "NONCE", fmt.Sprint(time.Now().UnixNano()))
	file := filepath.Join(fm.dir, "build.nix")
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	kilnBuild := func(attr string) (string, string, error) {
		file := file
		if attr == "slow" {
			file = filepath.Join(fm.dir, "slow.nix")
			if err := os.WriteFile(file, []byte(slow("0.5")), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		cmd := exec.Command(kilnBin, "build", "-f", file, "-A", attr, "--coordinator", "http://"+f1.http,
			"--token-file", tokenFile, "--store", fm.nx.store("src"), "--timeout", "2m")
		cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(fm.dir, "xdg-build-"+attr))
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		return out.String(), errb.String(), err
	}
	out, errOut, err := kilnBuild("c3")
	if err != nil {
		t.Fatalf("kiln build c3: %v\n%s", err, errOut)
	}
	paths := strings.Fields(out)
	if len(paths) != 1 || !strings.HasSuffix(paths[0], "-chain-3") {
		t.Fatalf("kiln build printed %q, want the chain-3 output", out)
	}
	if !strings.Contains(errOut, "steps: 3 done") {
		t.Errorf("progress never showed the three steps done:\n%s", errOut)
	}
	// The log of a running step is shown while it runs.
	if _, errOut, err = kilnBuild("slow"); err != nil {
		t.Fatalf("kiln build slow: %v\n%s", err, errOut)
	}
	if !strings.Contains(errOut, "slow> tick 3") {
		t.Errorf("no live log lines in kiln build's output:\n%s", errOut)
	}
	out, errOut, err = kilnBuild("afterFail")
	if err == nil {
		t.Fatalf("kiln build of a failing build succeeded: %s", out)
	}
	if !strings.Contains(errOut, "-fails.drv") || !strings.Contains(errOut, "> about to fail") {
		t.Errorf("failure report lacks the failing step or its log:\n%s", errOut)
	}
}
