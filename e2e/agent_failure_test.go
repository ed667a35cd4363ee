package e2e

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

const slowExpr = `
let nonce = "NONCE"; in {
  slow = derivation {
    name = "slow";
    inherit nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo start $nonce; for i in 1 2 3 4 5 6; do echo tick $i; sleep SECS; done; echo end; mkdir -p $out; echo done > $out/result" ];
  };
}`

func slow(secs string) string {
	return strings.NewReplacer("NONCE", fmt.Sprint(time.Now().UnixNano()), "SECS", secs).Replace(slowExpr)
}

var buildingRe = regexp.MustCompile(`msg=building lease=(\d+) `)

// firstLease is the lease ID of the first build an agent started.
func firstLease(t *testing.T, p *proc) string {
	t.Helper()
	var id string
	waitFor(t, 30*time.Second, p.name+" starts building", func() bool {
		b, _ := os.ReadFile(p.log.Name())
		if m := buildingRe.FindSubmatch(b); m != nil {
			id = string(m[1])
			return true
		}
		return false
	})
	return id
}

// TestAgentKilledMidBuild: kill -9 the agent building a step; the step is
// leased again to the other agent and the build succeeds.
func TestAgentKilledMidBuild(t *testing.T) {
	fm := startFarm(t)
	f1, f2, _ := fm.followers()
	a := fm.startAgent("agentA", f1, "benchmark")
	ids, drvs := fm.submit(f1, slow("0.5"), "slow")
	firstLease(t, a)
	a.kill()
	fm.startAgent("agentB", f2, "benchmark")
	res := fm.waitFinished(f2, 60*time.Second, ids)
	if b := res["slow"]; b.BuildStatus == nil || *b.BuildStatus != 0 {
		t.Fatalf("build status %v, want 0", b.BuildStatus)
	}
	recorded, err := fm.recordedLog("agentB", drvs["slow"])
	if err != nil {
		t.Fatalf("agentB did not build the step: %v", err)
	}
	if code, stored := fm.storedLog(f1, drvs["slow"]); code != 200 || stored != string(recorded) {
		t.Errorf("stored log %d %q, want agentB's %q", code, stored, recorded)
	}
}

// TestAgentStoppedPastTTL: an agent frozen with SIGSTOP past its lease TTL
// and then resumed has its completion refused, and nothing it uploads
// under the old lease is recorded.
func TestAgentStoppedPastTTL(t *testing.T) {
	fm := startFarm(t)
	f1, _, li := fm.followers()
	a := fm.startAgent("agentA", f1, "benchmark")
	ids, _ := fm.submit(f1, slow("0.3"), "slow")
	lease := firstLease(t, a)
	a.signal(syscall.SIGSTOP)
	leader := fm.nodes[li]
	waitFor(t, 30*time.Second, "the frozen agent's lease expires", func() bool {
		return leader.logged("lease expired") && leader.logged("lease="+lease)
	})
	a.signal(syscall.SIGCONT)
	res := fm.waitFinished(f1, 60*time.Second, ids)
	if b := res["slow"]; b.BuildStatus == nil || *b.BuildStatus != 0 {
		t.Fatalf("build status %v, want 0 (built again under a new lease)", b.BuildStatus)
	}
	waitFor(t, 20*time.Second, "the old lease's work is refused or stopped", func() bool {
		return a.logged("completion refused") || a.logged("upload refused") || a.logged("lease cancelled by the coordinator")
	})
	for _, n := range fm.nodes {
		if n.logged(`msg="output uploaded" lease=`+lease+" ") || n.logged(`msg="lease completed" lease=`+lease+" ") {
			t.Errorf("%s recorded work under the expired lease %s", n.name, lease)
		}
	}
}

// TestLeaderKilledMidBuild: kill -9 the leader while a step builds; the
// build still finishes, and its stored log is complete.
func TestLeaderKilledMidBuild(t *testing.T) {
	fm := startFarm(t)
	f1, f2, li := fm.followers()
	fm.startAgent("agentA", f1, "benchmark")
	ids, drvs := fm.submit(f1, slow("0.5"), "slow")
	waitFor(t, 30*time.Second, "the live log reaches the leader", func() bool {
		return fm.nodes[li].logged("lease granted")
	})
	fm.nodes[li].kill()
	res := fm.waitFinished(f2, 90*time.Second, ids)
	if b := res["slow"]; b.BuildStatus == nil || *b.BuildStatus != 0 {
		t.Fatalf("build status %v, want 0", b.BuildStatus)
	}
	recorded, err := fm.recordedLog("agentA", drvs["slow"])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(recorded), "tick 6") {
		t.Fatalf("recorded log %q is not the whole build", recorded)
	}
	waitFor(t, 10*time.Second, "the complete log on a survivor", func() bool {
		code, stored := fm.storedLog(f2, drvs["slow"])
		return code == 200 && stored == string(recorded)
	})
}

// TestAgentSurvivesItsCoordinator: an agent given one coordinator's
// address (the leader's) learns the others; when that coordinator is
// killed it keeps building what is submitted through the survivors.
func TestAgentSurvivesItsCoordinator(t *testing.T) {
	fm := startFarm(t)
	f1, _, li := fm.followers()
	leader := fm.nodes[li]
	a := fm.startAgent("agentA", leader, "")
	waitFor(t, 30*time.Second, "the agent learns the other coordinators", func() bool {
		return a.logged("coordinators discovered")
	})
	ids, _ := fm.submit(f1, slow("0.05"), "slow")
	fm.waitFinished(f1, 60*time.Second, ids)
	leader.kill()
	waitFor(t, 30*time.Second, "a new leader", func() bool { return leaderOf(fm.nodes) >= 0 })
	ids, _ = fm.submit(f1, slow("0.05"), "slow")
	res := fm.waitFinished(f1, 90*time.Second, ids)
	if b := res["slow"]; b.BuildStatus == nil || *b.BuildStatus != 0 {
		t.Fatalf("build after losing the agent's coordinator: status %v, want 0", b.BuildStatus)
	}
}
