package coordinator

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestMetrics: /metrics is lint-clean and reports the queue, builds, Raft
// and cache traffic as they change.
func TestMetrics(t *testing.T) {
	tc := startCluster(t, 1, withCacheKey(t), withAgents)
	c := tc.nodes[0]
	if _, err := c.SubmitBuild(context.Background(), agentGraph()); err != nil {
		t.Fatal(err)
	}
	httpDo(t, http.MethodGet, "http://"+c.HTTPAddr()+"/cache/"+strings.Repeat("0", 32)+".narinfo", "", nil)
	n := makeNar(t, "metrics", nil)
	if st, msg := push(t, c.HTTPAddr(), n); st != http.StatusOK {
		t.Fatalf("push: %d %s", st, msg)
	}
	if st, _ := httpDo(t, http.MethodGet, n.narURL(c.HTTPAddr()), "", nil); st != http.StatusOK {
		t.Fatalf("NAR GET %d", st)
	}
	problems, err := testutil.GatherAndLint(c.metrics.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	resp, err := http.Get("http://" + c.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`kiln_queue_steps{state="runnable",system="x86_64-linux"} 1`,
		`kiln_queue_steps{state="waiting",system="x86_64-linux"} 1`,
		`kiln_builds{status="queued"} 1`,
		`kiln_raft_state{state="Leader"} 1`,
		`kiln_cache_requests_total{kind="narinfo",result="miss"} 1`,
		`kiln_raft_commit_seconds_count`,
		`kiln_cache_requests_total{kind="nar",result="hit"} 1`,
		fmt.Sprintf("kiln_nar_bytes_out_total %d", len(n.zst)),
		fmt.Sprintf("kiln_nar_bytes_in_total %d", len(n.zst)),
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
