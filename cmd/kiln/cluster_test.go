package main

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnci/kiln/coordinator"
)

const clusterTestToken = "cluster-cli-test-token-0123"

// startCoordinators runs n in-process coordinators on loopback ports (the
// first bootstraps, the others join it) and waits until every one is
// ready and knows every member's addresses.
func startCoordinators(t *testing.T, n int) []*coordinator.Coordinator {
	t.Helper()
	var cs []*coordinator.Coordinator
	t.Cleanup(func() {
		for _, c := range cs {
			_ = c.Close()
		}
	})
	for i := range n {
		cfg := coordinator.Config{
			DataDir: t.TempDir(), NodeID: "n" + string(rune('0'+i)),
			HTTPAddr: "127.0.0.1:0", RaftAddr: "127.0.0.1:0", AdminToken: clusterTestToken,
			HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond,
			LeaderLeaseTimeout: 100 * time.Millisecond, CommitTimeout: 5 * time.Millisecond,
			ApplyTimeout: 5 * time.Second, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		if i == 0 {
			cfg.Bootstrap = true
		} else {
			cfg.Join = []string{cs[0].HTTPAddr()}
		}
		c, err := coordinator.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ok := true
		for _, c := range cs {
			ns, err := c.Read().Nodes()
			if ready, _ := c.Ready(); !ready || err != nil || len(ns) != n {
				ok = false
			}
		}
		if ok {
			return cs
		}
		if time.Now().After(deadline) {
			t.Fatal("the coordinators did not become ready")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runKiln runs the kiln command line and returns its output.
func runKiln(args ...string) (string, error) {
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestClusterCommand(t *testing.T) {
	cs := startCoordinators(t, 2)
	n0, n1 := cs[0], cs[1]
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "admin-token")
	wrongFile := filepath.Join(dir, "wrong-token")
	for p, tok := range map[string]string{tokenFile: clusterTestToken, wrongFile: "not-the-admin-token-0123"} {
		if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	at := func(c *coordinator.Coordinator) string { return "http://" + c.HTTPAddr() }

	// members needs no token and shows every member, asked of a follower.
	out, err := runKiln("cluster", "members", "--coordinator", at(n1))
	if err != nil {
		t.Fatalf("members: %v\n%s", err, out)
	}
	for _, want := range []string{"ID", "RAFT ADDRESS", "HTTP ADDRESS", "VOTER", "LEADER", "leader: n0"} {
		if !strings.Contains(out, want) {
			t.Fatalf("members output lacks %q:\n%s", want, out)
		}
	}
	for _, c := range cs {
		row := rowOf(out, c.ID())
		leader := "no"
		if c == n0 {
			leader = "yes"
		}
		if want := []string{c.ID(), c.RaftAddr(), c.HTTPAddr(), "yes", leader}; strings.Join(row, " ") != strings.Join(want, " ") {
			t.Fatalf("members row of %s: %q, want %q\n%s", c.ID(), row, want, out)
		}
	}

	refusals := []struct {
		name string
		args []string
		want string
	}{
		{"remove without a token file", []string{"cluster", "remove", "n1", "--coordinator", at(n0)}, "--token-file is required"},
		{"remove with a wrong token", []string{"cluster", "remove", "n1", "--coordinator", at(n0), "--token-file", wrongFile}, "permission_denied"},
		{"remove an unknown node", []string{"cluster", "remove", "ghost", "--coordinator", at(n1), "--token-file", tokenFile}, "not_found"},
		{"remove the leader", []string{"cluster", "remove", "n0", "--coordinator", at(n1), "--token-file", tokenFile}, "transfer leadership first"},
		{"transfer without a token file", []string{"cluster", "transfer-leadership", "--coordinator", at(n0)}, "--token-file is required"},
		{"transfer to an unknown node", []string{"cluster", "transfer-leadership", "--to", "ghost", "--coordinator", at(n0), "--token-file", tokenFile}, "not_found"},
		{"no coordinator", []string{"cluster", "members"}, "--coordinator is required"},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			out, err := runKiln(tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("kiln %s: %v (output %q), want an error with %q", strings.Join(tt.args, " "), err, out, tt.want)
			}
		})
	}

	// Hand leadership to n1 (the address without a scheme works too),
	// then remove n0 through n1.
	out, err = runKiln("cluster", "transfer-leadership", "--to", "n1", "--coordinator", n0.HTTPAddr(), "--token-file", tokenFile)
	if err != nil || !strings.Contains(out, "leadership moved from n0 to n1") {
		t.Fatalf("transfer-leadership: %v\n%s", err, out)
	}
	out, err = runKiln("cluster", "transfer-leadership", "--to", "n1", "--coordinator", at(n0), "--token-file", tokenFile)
	if err != nil || !strings.Contains(out, "n1 already leads") {
		t.Fatalf("transfer-leadership to the leader: %v\n%s", err, out)
	}
	out, err = runKiln("cluster", "remove", "n0", "--coordinator", at(n1), "--token-file", tokenFile)
	if err != nil || !strings.Contains(out, "removed n0 (leader: n1)") || rowOf(out, "n0") != nil || rowOf(out, "n1") == nil {
		t.Fatalf("remove n0: %v\n%s", err, out)
	}
	out, err = runKiln("cluster", "members", "--coordinator", at(n1))
	if err != nil || rowOf(out, "n0") != nil || len(rowOf(out, "n1")) != 5 {
		t.Fatalf("members after the removal: %v\n%s", err, out)
	}
	// n1 is now the last voter.
	out, err = runKiln("cluster", "remove", "n1", "--coordinator", at(n1), "--token-file", tokenFile)
	if err == nil || !strings.Contains(err.Error(), "last voter") {
		t.Fatalf("removing the last voter: %v\n%s", err, out)
	}
}

// rowOf returns the fields of the table row for id, or nil.
func rowOf(out, id string) []string {
	for line := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == id {
			return f
		}
	}
	return nil
}
