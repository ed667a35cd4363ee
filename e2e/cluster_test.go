package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

type coordProc struct {
	*proc
	http, raft string
	dataDir    string
}

// startCoordinators starts n real `kiln coordinator` processes (the first
// bootstraps, the others join it), with extra(i) appended to node i's
// arguments, and waits until every node is ready and sees n voters. Their
// logs are dumped if the test fails.
func startCoordinators(t testing.TB, n int, extra func(i int) []string) []*coordProc {
	t.Helper()
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var nodes []*coordProc
	for i := 0; i < n; i++ {
		httpAddr, raftAddr := freeAddr(t), freeAddr(t)
		data := filepath.Join(dir, fmt.Sprintf("n%d", i))
		args := []string{"coordinator", "--data-dir", data,
			"--http-addr", httpAddr, "--raft-addr", raftAddr, "--admin-token-file", tokenFile,
			"--node-id", fmt.Sprintf("n%d", i), "--raft-heartbeat-timeout", "300ms", "--raft-election-timeout", "300ms"}
		if i == 0 {
			args = append(args, "--bootstrap")
		} else {
			args = append(args, "--join", "http://"+nodes[0].http)
		}
		if extra != nil {
			args = append(args, extra(i)...)
		}
		nodes = append(nodes, &coordProc{proc: startProc(t, fmt.Sprintf("n%d", i), args...), http: httpAddr, raft: raftAddr, dataDir: data})
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range nodes {
				n.dumpLog()
			}
		}
	})
	waitFor(t, 30*time.Second, fmt.Sprintf("%d voters and every node ready", n), func() bool {
		for _, node := range nodes {
			if code, _ := getJSON("http://"+node.http+"/ready", nil); code != 200 || countVoters(node) != n {
				return false
			}
		}
		return true
	})
	return nodes
}

// countVoters is how many voters with an HTTP address a node reports (-1
// when it knows no leader or does not answer).
func countVoters(n *coordProc) int {
	var v clusterView
	if code, err := getJSON("http://"+n.http+"/api/v1/cluster", &v); err != nil || code != 200 || v.Leader == "" {
		return -1
	}
	voters := 0
	for _, m := range v.Members {
		if m.Voter && m.HTTPAddr != "" {
			voters++
		}
	}
	return voters
}

// leaderOf is the index of the node that says it leads, or -1.
func leaderOf(nodes []*coordProc) int {
	for i, n := range nodes {
		var v clusterView
		if code, err := getJSON("http://"+n.http+"/api/v1/cluster", &v); err == nil && code == 200 && v.State == "Leader" {
			return i
		}
	}
	return -1
}
