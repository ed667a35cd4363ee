package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// gossipFarm is a farm whose coordinators share a gossip pool, with the
// production lease TTL (30 s): only gossip can detect a dead agent fast.
func gossipFarm(t *testing.T) *farm {
	t.Helper()
	addrs := []string{freeGossipAddr(t), freeGossipAddr(t), freeGossipAddr(t)}
	return startFarmWith(t, func(i int) []string {
		return []string{"--gossip-addr", addrs[i], "--retry-join", strings.Join(addrs, ","),
			"--gossip-probe-interval", "200ms", "--lease-ttl", "30s"}
	})
}

var gossipAgentArgs = []string{"--gossip-addr", "127.0.0.1:0", "--gossip-probe-interval", "200ms"}

// stepView is what these tests read of a step.
type stepView struct {
	State     string `json:"state"`
	Tries     uint32 `json:"tries"`
	Attempts  uint32 `json:"attempts"`
	LastError string `json:"last_error"`
}

func (fm *farm) step(node *coordProc, drv string) stepView {
	fm.t.Helper()
	var s stepView
	if code, err := getJSON("http://"+node.http+"/api/v1/steps/"+strings.TrimPrefix(drv, "/nix/store/"), &s); err != nil || code != 200 {
		fm.t.Fatalf("step %s: %d %v", drv, code, err)
	}
	return s
}

// agentGossip is the gossip state /api/v1/status gives an agent.
func agentGossip(t *testing.T, node *coordProc, name string) string {
	t.Helper()
	var st struct {
		Agents []struct {
			Name   string `json:"name"`
			Live   bool   `json:"live"`
			Gossip string `json:"gossip"`
		} `json:"agents"`
	}
	if code, err := getJSON("http://"+node.http+"/api/v1/status", &st); err != nil || code != 200 {
		t.Fatalf("status: %d %v", code, err)
	}
	for _, a := range st.Agents {
		if a.Name == name {
			return a.Gossip
		}
	}
	return ""
}

// TestGossipAgentKilledIsRequeuedFast: kill -9 an agent mid-build; the
// pool declares it dead and its step is queued again within 10 s, well
// under the 30 s lease TTL; another agent builds it.
func TestGossipAgentKilledIsRequeuedFast(t *testing.T) {
	fm := gossipFarm(t)
	f1, f2, li := fm.followers()
	a := fm.startAgent("agentA", f1, "", append(gossipAgentArgs, "--name", "agentA")...)
	waitFor(t, 30*time.Second, "agentA is reachable by gossip", func() bool { return agentGossip(t, f2, "agentA") == "reachable" })
	ids, drvs := fm.submit(f1, slow("1"), "slow")
	firstLease(t, a)
	a.kill()
	killed := time.Now()
	leader := fm.nodes[li]
	waitFor(t, 15*time.Second, "the step is queued again", func() bool {
		s := fm.step(leader, drvs["slow"])
		return s.State == "runnable" || s.Tries > 0
	})
	d := time.Since(killed)
	t.Logf("step queued again %v after kill -9", d.Round(100*time.Millisecond))
	if d > 10*time.Second {
		t.Errorf("re-queued %v after kill -9, want under 10 s (TTL 30 s)", d)
	}
	if !leader.logged("declared dead by gossip") {
		t.Errorf("the leader did not expire the lease through gossip")
	}
	fm.startAgent("agentB", f2, "", gossipAgentArgs...)
	res := fm.waitFinished(f2, 60*time.Second, ids)
	if b := res["slow"]; b.BuildStatus == nil || *b.BuildStatus != 0 {
		t.Fatalf("build status %v, want 0", b.BuildStatus)
	}
}

// TestGossipAgentDrainsOnSIGTERM: SIGTERM to an agent mid-build: it takes
// no new lease, finishes the build, leaves the pool and exits; nothing it
// completed runs again. With a short --drain-timeout, a build still
// running is handed back and queued again at once.
func TestGossipAgentDrainsOnSIGTERM(t *testing.T) {
	fm := gossipFarm(t)
	f1, f2, li := fm.followers()
	leader := fm.nodes[li]
	a := fm.startAgent("agentA", f1, "", append(gossipAgentArgs, "--name", "agentA", "--max-jobs", "1")...)
	waitFor(t, 30*time.Second, "agentA is reachable by gossip", func() bool { return agentGossip(t, f2, "agentA") == "reachable" })
	ids, drvs := fm.submit(f1, slow("0.5"), "slow")
	firstLease(t, a)
	// More work arrives while it drains: it must not take it.
	later, laterDrvs := fm.submit(f1, slow("1"), "slow")
	a.signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(60 * time.Second):
		t.Fatal("the draining agent did not exit")
	}
	if !a.logged("draining") || !a.logged("left the gossip pool") {
		t.Errorf("agent log lacks the drain or the leave")
	}
	res := fm.waitFinished(f2, 10*time.Second, ids)
	if b := res["slow"]; b.BuildStatus == nil || *b.BuildStatus != 0 {
		t.Fatalf("drained build status %v, want 0", b.BuildStatus)
	}
	if s := fm.step(leader, drvs["slow"]); s.Attempts != 1 || s.State != "succeeded" {
		t.Errorf("the drained step ran %d times (%s), want once", s.Attempts, s.State)
	}
	if s := fm.step(leader, laterDrvs["slow"]); s.Attempts != 0 {
		t.Errorf("a draining agent took new work: %+v", s)
	}
	waitFor(t, 10*time.Second, "the pool shows agentA gone", func() bool { return agentGossip(t, f2, "agentA") == "unreachable" })

	// Past the drain timeout, the running build is handed back.
	b := fm.startAgent("agentB", f2, "", append(gossipAgentArgs, "--name", "agentB", "--max-jobs", "1", "--drain-timeout", "1s")...)
	firstLease(t, b)
	b.signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(30 * time.Second):
		t.Fatal("agentB did not exit after its drain timeout")
	}
	if !b.logged("lease handed back") {
		t.Fatalf("agentB did not hand its lease back")
	}
	s := fm.step(leader, laterDrvs["slow"])
	if s.State != "runnable" || s.Tries != 0 || !strings.Contains(s.LastError, "handed back") {
		t.Errorf("handed-back step: %+v (want runnable at once, no try counted)", s)
	}
	fm.startAgent("agentC", f1, "", gossipAgentArgs...)
	res = fm.waitFinished(f1, 60*time.Second, later)
	if r := res["slow"]; r.BuildStatus == nil || *r.BuildStatus != 0 {
		t.Fatalf("handed-back build status %v, want 0", r.BuildStatus)
	}
}

// TestGossipClusterFromRetryJoin: three coordinators given only
// --retry-join and --bootstrap-expect 3 form a cluster; under a steady
// stream of submissions one is killed and a fresh node joins in its
// place; the dead one is removed; no acknowledged build is lost.
func TestGossipClusterFromRetryJoin(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	gaddrs := []string{freeGossipAddr(t), freeGossipAddr(t), freeGossipAddr(t)}
	start := func(i int, expect string, join []string) *coordProc {
		httpAddr, raftAddr, gaddr := freeAddr(t), freeAddr(t), freeGossipAddr(t)
		if i < len(gaddrs) {
			gaddr = gaddrs[i]
		}
		data := filepath.Join(dir, fmt.Sprintf("n%d", i))
		args := []string{"coordinator", "--data-dir", data, "--http-addr", httpAddr, "--raft-addr", raftAddr,
			"--admin-token-file", tokenFile, "--node-id", fmt.Sprintf("n%d", i),
			"--raft-heartbeat-timeout", "300ms", "--raft-election-timeout", "300ms",
			"--gossip-addr", gaddr, "--retry-join", strings.Join(join, ","), "--gossip-probe-interval", "200ms",
			"--dead-server-cleanup", "3s"}
		if expect != "" {
			args = append(args, "--bootstrap-expect", expect)
		}
		return &coordProc{proc: startProc(t, fmt.Sprintf("n%d", i), args...), http: httpAddr, raft: raftAddr, dataDir: data}
	}
	var nodes []*coordProc
	for i := 0; i < 3; i++ {
		nodes = append(nodes, start(i, "3", gaddrs))
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range nodes {
				n.dumpLog()
			}
		}
	})
	waitFor(t, 30*time.Second, "three voters, every node ready", func() bool {
		for _, n := range nodes {
			if code, _ := getJSON("http://"+n.http+"/ready", nil); code != 200 || countVoters(n) != 3 {
				return false
			}
		}
		return true
	})

	// A steady stream of submissions, through whichever node answers.
	stop := make(chan struct{})
	acked := make(chan uint64, 100000)
	var count atomic.Int64
	streamDone := make(chan struct{})
	targets := append([]*coordProc(nil), nodes...)
	go func() {
		defer close(streamDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			for k := range targets {
				n := targets[(i+k)%len(targets)]
				var out buildView
				if code, err := postJSON("http://"+n.http+"/api/v1/builds", token, buildRequest(i), &out); err == nil && code == 201 {
					acked <- out.ID
					count.Add(1)
					break
				}
			}
		}
	}()
	waitFor(t, 20*time.Second, "submissions flow", func() bool { return count.Load() >= 10 })
	victim := (leaderOf(nodes) + 1) % 3 // a follower
	nodes[victim].kill()
	fresh := start(3, "", []string{gaddrs[(victim+1)%3]})
	survivors := []*coordProc{nodes[(victim+1)%3], nodes[(victim+2)%3], fresh}
	waitFor(t, 45*time.Second, "the fresh node is a voter and the dead one is removed", func() bool {
		var v clusterView
		if code, err := getJSON("http://"+survivors[0].http+"/api/v1/cluster", &v); err != nil || code != 200 {
			return false
		}
		ids := map[string]bool{}
		for _, m := range v.Members {
			if m.Voter {
				ids[m.ID] = true
			}
		}
		return len(ids) == 3 && ids["n3"] && !ids[fmt.Sprintf("n%d", victim)]
	})
	after := count.Load()
	waitFor(t, 20*time.Second, "submissions flow after the replacement", func() bool { return count.Load() >= after+10 })
	close(stop)
	<-streamDone
	close(acked)
	nodes = append(nodes, fresh)
	var got []uint64
	for id := range acked {
		got = append(got, id)
	}
	if len(got) < 20 {
		t.Fatalf("only %d submissions were acknowledged", len(got))
	}
	// The operator's view: Raft members and the pool.
	out, err := exec.Command(kilnBin, "cluster", "members", "--coordinator", "http://"+survivors[0].http).CombinedOutput()
	if err != nil {
		t.Fatalf("kiln cluster members: %v\n%s", err, out)
	}
	for _, want := range []string{"GOSSIP MEMBER", "n3", "alive", "coordinator"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("kiln cluster members lacks %q:\n%s", want, out)
		}
	}
	waitFor(t, 20*time.Second, "every acknowledged build on every survivor", func() bool {
		for _, n := range survivors {
			for _, id := range got {
				if code, _ := getJSON(fmt.Sprintf("http://%s/api/v1/builds/%d", n.http, id), nil); code != 200 {
					return false
				}
			}
		}
		return true
	})
}
