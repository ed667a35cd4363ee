package coordinator

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/gossip"
	"github.com/kilnci/kiln/internal/freeport"
	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
)

// logBuffer collects a coordinator's log lines for assertions.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) has(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Contains(l.b.String(), s)
}

// withGossip puts every node in one pool: node 0's address is picked
// up front, the others join it.
func withGossip(t testing.TB) func(int, *Config) {
	first := freeport.For(t, true) // out of the range the nodes' ":0" listeners draw from
	return func(i int, cfg *Config) {
		cfg.GossipAddr = "127.0.0.1:0"
		if i == 0 {
			cfg.GossipAddr = first
		} else {
			cfg.RetryJoin = []string{first}
		}
		cfg.GossipProbeInterval = 100 * time.Millisecond
	}
}

// fakeMember joins the pool as an agent would (through every coordinator
// of tc, as an agent given all their addresses does), with meta claiming
// id. Joining exchanges state with each of them directly: memberlist's
// UDP gossip, which can lose a member's news under load, then leaves it
// to the 30 s push-pull sync.
func fakeMember(t *testing.T, tc *testCluster, name, agentID string) *gossip.Pool {
	t.Helper()
	p, err := gossip.New(gossip.Config{Name: name, BindAddr: "127.0.0.1:0", ProbeInterval: 100 * time.Millisecond,
		Meta: gossip.Meta{Role: gossip.RoleAgent, AgentID: agentID, Systems: []string{"x86_64-linux"}, MaxJobs: 2}, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Shutdown() })
	var joins []string
	for _, c := range tc.nodes {
		joins = append(joins, c.GossipAddr())
	}
	if n, err := p.Join(context.Background(), joins); err != nil || n != len(joins) {
		t.Fatalf("joining the pool: %d %v", n, err)
	}
	return p
}

// TestGossipDeadAgentLosesLeasesAtOnce: an agent whose gossip member dies
// (kill -9) loses its lease within seconds, not after the 30 s TTL.
func TestGossipDeadAgentLosesLeasesAtOnce(t *testing.T) {
	tc := startCluster(t, 3, withCacheKey(t), withAgents, withGossip(t), func(_ int, cfg *Config) { cfg.LeaseTTL = 30 * time.Second })
	_, l := tc.leader(5 * time.Second)
	a := registerAgent(t, l.HTTPAddr())
	member := fakeMember(t, tc, "agent-member", a.id)
	tc.waitFor(10*time.Second, "the leader sees the agent in the pool", func() bool { return l.GossipAgents()[a.id] == gossip.StateAlive })
	if _, err := l.SubmitBuild(context.Background(), agentGraph()); err != nil {
		t.Fatal(err)
	}
	ls, err := a.lease(5)
	if err != nil || len(ls) != 1 {
		t.Fatalf("lease: %v %v", ls, err)
	}
	killed := time.Now()
	_ = member.Shutdown() // no leave: a crash
	tc.waitFor(12*time.Second, "the step is runnable again", func() bool {
		s, err := l.Read().Step(ls[0].DrvPath)
		return err == nil && s.State == pb.StepState_STEP_STATE_RUNNABLE
	})
	if d := time.Since(killed); d > 10*time.Second {
		t.Errorf("re-queued %v after the agent died, want under 10 s", d)
	}
	s, _ := l.Read().Step(ls[0].DrvPath)
	if !strings.Contains(s.LastError, "declared dead by gossip") || s.Tries != 1 {
		t.Errorf("step after the agent died: tries %d, last error %q", s.Tries, s.LastError)
	}
}

// TestGossipGrantsNothing: a pool member that never registered gets no
// lease and no place among the agents; one claiming a registered agent's
// ID cannot take its work away by dying while the agent heartbeats.
func TestGossipGrantsNothing(t *testing.T) {
	tc := startCluster(t, 3, withCacheKey(t), withAgents, withGossip(t), func(_ int, cfg *Config) { cfg.LeaseTTL = 30 * time.Second })
	_, l := tc.leader(5 * time.Second)
	stranger := fakeMember(t, tc, "stranger", "agent-0000000000000000")
	tc.waitFor(10*time.Second, "the stranger is in the leader's pool", func() bool {
		return l.GossipAgents()["agent-0000000000000000"] == gossip.StateAlive
	})
	if _, err := l.SubmitBuild(context.Background(), agentGraph()); err != nil {
		t.Fatal(err)
	}
	// The work waits for an agent with a credential.
	agents, _ := l.Read().Agents()
	leases, _ := l.Read().Leases()
	if len(agents) != 0 || len(leases) != 0 {
		t.Fatalf("a gossip member became an agent: agents %v leases %v", agents, leases)
	}
	_ = stranger.Shutdown()

	// An impostor of a live agent dies; the agent keeps its lease.
	a := registerAgent(t, l.HTTPAddr())
	ls, err := a.lease(5)
	if err != nil || len(ls) != 1 {
		t.Fatalf("lease: %v %v", ls, err)
	}
	impostor := fakeMember(t, tc, "impostor", a.id)
	tc.waitFor(10*time.Second, "the impostor is in the leader's pool", func() bool { return l.GossipAgents()[a.id] == gossip.StateAlive })
	_ = impostor.Shutdown()
	deadline := time.Now().Add(9 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := a.client.Heartbeat(context.Background(), req(&kilnv1.HeartbeatRequest{LeaseIds: []uint64{ls[0].LeaseId}}, a.cred)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second) // the agent's heartbeat period
	}
	if l.GossipAgents()[a.id] == gossip.StateAlive {
		t.Fatal("the impostor was never declared dead: the test proves nothing")
	}
	if s, _ := l.Read().Step(ls[0].DrvPath); s.State != pb.StepState_STEP_STATE_LEASED || s.LeaseId != ls[0].LeaseId {
		t.Errorf("a heartbeating agent lost its lease to gossip: %v", s)
	}
}

// TestGossipBootstrapExpectAndCleanup: three coordinators given only each
// other's gossip addresses and --bootstrap-expect 3 form a cluster; a
// fourth is added as a voter by the leader; a stopped one is removed once
// it has been dead for the cleanup time, leaving three voters.
func TestGossipBootstrapExpectAndCleanup(t *testing.T) {
	addrs := []string{freeport.For(t, true), freeport.For(t, true), freeport.For(t, true)}
	var nodes []*Coordinator
	logs := map[string]*logBuffer{}
	start := func(i int, expect int) *Coordinator {
		cfg := testConfig(t.TempDir())
		cfg.NodeID = fmt.Sprintf("g%d", i)
		cfg.GossipAddr = "127.0.0.1:0"
		if i < len(addrs) {
			cfg.GossipAddr = addrs[i]
		}
		cfg.RetryJoin = addrs
		cfg.BootstrapExpect = expect
		cfg.GossipProbeInterval = 100 * time.Millisecond
		cfg.DeadServerCleanup = time.Second
		lb := &logBuffer{}
		logs[cfg.NodeID] = lb
		cfg.Logger = slogTo(lb)
		c, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	for i := 0; i < 3; i++ {
		nodes = append(nodes, start(i, 3))
	}
	tc := &testCluster{t: t, nodes: nodes}
	voters := func(c *Coordinator) []string {
		f := c.Raft().GetConfiguration()
		if f.Error() != nil {
			return nil
		}
		var out []string
		for _, s := range f.Configuration().Servers {
			if s.Suffrage == raft.Voter {
				out = append(out, string(s.ID))
			}
		}
		return out
	}
	_, l := tc.leader(20 * time.Second)
	tc.waitFor(10*time.Second, "three voters with their addresses recorded", func() bool {
		if len(voters(l)) != 3 {
			return false
		}
		for _, n := range nodes {
			rec, err := l.Read().Node(n.ID())
			if err != nil || rec.HttpAddr != n.HTTPAddr() || rec.GossipAddr == "" {
				return false
			}
		}
		return true
	})
	if _, err := l.SubmitBuild(context.Background(), agentGraph()); err != nil {
		t.Fatal(err)
	}
	// A fourth node with only --retry-join is added by the leader.
	fourth := start(3, 0)
	tc.nodes = append(tc.nodes, fourth)
	tc.waitFor(15*time.Second, "the fourth node is a voter", func() bool {
		_, l := tc.leader(5 * time.Second)
		return len(voters(l)) == 4
	})
	// A follower stops (not leaving): once dead for the cleanup time it
	// is removed, since three voters remain.
	_, f := tc.follower()
	gone := f.ID()
	for i, n := range tc.nodes {
		if n == f {
			tc.stop(i)
		}
	}
	tc.waitFor(20*time.Second, "the dead node is removed", func() bool {
		_, l := tc.leader(5 * time.Second)
		vs := voters(l)
		return len(vs) == 3 && !slices.Contains(vs, gone)
	})
	// The build submitted before all this is still there.
	_, l = tc.leader(5 * time.Second)
	if bs, total, err := l.Read().Builds(buildFilterAll(), 0, 10); err != nil || total != 1 || len(bs) != 1 {
		t.Fatalf("builds after the membership changes: %d %v", total, err)
	}
	// Removed by an operator, a live node is not added back by gossip.
	_, f = tc.follower()
	if err := l.removeServerByOperator(context.Background(), f.ID()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // several membership rounds
	if vs := voters(l); slices.Contains(vs, f.ID()) {
		t.Errorf("gossip added back the node an operator removed: %v", vs)
	}
}

func slogTo(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.MultiWriter(w, testLogWriter()), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func testLogWriter() io.Writer {
	if os.Getenv("KILN_TEST_LOG") != "" {
		return os.Stderr
	}
	return io.Discard
}

func buildFilterAll() raftfsm.BuildFilter { return raftfsm.BuildFilter{} }
