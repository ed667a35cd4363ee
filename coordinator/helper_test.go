package coordinator

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

const testToken = "test-admin-token-0123456789"

// testCluster is an N-node in-process cluster on loopback ":0" ports with
// short Raft timeouts. Nodes can be stopped and restarted from their data
// dirs on the same addresses.
type testCluster struct {
	t     testing.TB
	nodes []*Coordinator
	cfgs  []Config
}

func testLogger() *slog.Logger {
	if os.Getenv("KILN_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func testConfig(dir string) Config {
	return Config{
		DataDir: dir, HTTPAddr: "127.0.0.1:0", RaftAddr: "127.0.0.1:0", AdminToken: testToken,
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond,
		LeaderLeaseTimeout: 100 * time.Millisecond, CommitTimeout: 5 * time.Millisecond,
		ApplyTimeout: 5 * time.Second, Logger: testLogger(),
	}
}

// withDefaultRaftTimeouts gives a cluster the Raft timeouts a deployment
// has (hashicorp/raft's defaults) instead of the tests' short ones, under
// which a loaded 2-core machine (benchmarks, or large uploads under the
// race detector) loses its leader.
func withDefaultRaftTimeouts(_ int, cfg *Config) {
	cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout, cfg.CommitTimeout = 0, 0, 0, 0
}

// startCluster starts n nodes (the first bootstraps, the rest join it) and
// waits until all are voters and ready.
// Options adjust each node's config.
func startCluster(t testing.TB, n int, opts ...func(i int, cfg *Config)) *testCluster {
	t.Helper()
	tc := &testCluster{t: t}
	t.Cleanup(tc.closeAll)
	for i := 0; i < n; i++ {
		cfg := testConfig(t.TempDir())
		cfg.NodeID = fmt.Sprintf("n%d", i)
		for _, o := range opts {
			o(i, &cfg)
		}
		if i == 0 {
			cfg.Bootstrap = true
		} else {
			cfg.Join = []string{tc.nodes[0].HTTPAddr()}
		}
		c, err := New(cfg)
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		if err := c.Start(); err != nil {
			t.Fatalf("start node %d: %v", i, err)
		}
		// Restarts reuse the bound addresses.
		cfg.HTTPAddr, cfg.RaftAddr = c.HTTPAddr(), c.RaftAddr()
		tc.nodes = append(tc.nodes, c)
		tc.cfgs = append(tc.cfgs, cfg)
		if i == 0 {
			tc.waitFor(10*time.Second, "first node leads", func() bool { return c.IsLeader() })
		}
	}
	tc.waitFor(20*time.Second, "all nodes are voters and ready", func() bool {
		for _, c := range tc.nodes {
			if ok, _ := c.Ready(); !ok {
				return false
			}
			ms, _, err := c.members()
			if err != nil || len(ms) != n {
				return false
			}
			for _, m := range ms {
				if !m.Voter || m.HttpAddr == "" {
					return false
				}
			}
		}
		return true
	})
	return tc
}

func (tc *testCluster) closeAll() {
	for _, c := range tc.nodes {
		if c != nil {
			_ = c.Close()
		}
	}
}

// leader waits for a node that leads and accepts writes.
func (tc *testCluster) leader(timeout time.Duration) (int, *Coordinator) {
	tc.t.Helper()
	var idx int
	tc.waitFor(timeout, "a ready leader", func() bool {
		for i, c := range tc.nodes {
			if c != nil && c.IsLeader() {
				idx = i
				return true
			}
		}
		return false
	})
	return idx, tc.nodes[idx]
}

func (tc *testCluster) follower() (int, *Coordinator) {
	tc.t.Helper()
	li, _ := tc.leader(10 * time.Second)
	for i, c := range tc.nodes {
		if i != li && c != nil {
			return i, c
		}
	}
	tc.t.Fatal("no follower")
	return 0, nil
}

func (tc *testCluster) stop(i int) {
	tc.t.Helper()
	if err := tc.nodes[i].Close(); err != nil && err != raft.ErrRaftShutdown {
		tc.t.Logf("closing node %d: %v", i, err)
	}
	tc.nodes[i] = nil
}

// restart starts node i again from its data dir on its old addresses.
func (tc *testCluster) restart(i int) *Coordinator {
	tc.t.Helper()
	cfg := tc.cfgs[i]
	cfg.Bootstrap = false
	c, err := New(cfg)
	if err != nil {
		tc.t.Fatalf("restart node %d: %v", i, err)
	}
	if err := c.Start(); err != nil {
		tc.t.Fatalf("restart node %d: %v", i, err)
	}
	tc.nodes[i] = c
	return c
}

// waitFor polls cond until it holds or the deadline passes. Polling is
// bounded and each check is cheap; the deadline is what fails the test.
func (tc *testCluster) waitFor(timeout time.Duration, what string, cond func() bool) {
	tc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			tc.t.Fatalf("timed out after %v waiting for: %s", timeout, what)
		case <-tick.C:
		}
	}
}

// reloadTrailing returns c's reloadable Raft config with fewer trailing logs.
func reloadTrailing(c *Coordinator, n uint64) raft.ReloadableConfig {
	rc := c.Raft().ReloadableConfig()
	rc.TrailingLogs = n
	return rc
}
