package coordinator

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// fillBuilds commits evaluations until the state holds n builds across
// 10 projects × 2 jobsets; every other evaluation is cancelled, so half the
// builds are finished (status 4) and half queued.
func fillBuilds(b *testing.B, c *Coordinator, n int) {
	b.Helper()
	ctx := context.Background()
	for p := 0; p < 10; p++ {
		if err := c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_PUT_PROJECT, &pb.PutProject{Project: &pb.Project{Name: fmt.Sprintf("proj%d", p), Enabled: true}}); err != nil {
			b.Fatal(err)
		}
		for j := 0; j < 2; j++ {
			if err := c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_PUT_JOBSET, &pb.PutJobset{Jobset: &pb.Jobset{Project: fmt.Sprintf("proj%d", p), Name: fmt.Sprintf("js%d", j), Enabled: 1}}); err != nil {
				b.Fatal(err)
			}
		}
	}
	const perEval = 1000
	for e := 0; e < n/perEval; e++ {
		m := &pb.CreateEval{Eval: &pb.Eval{Project: fmt.Sprintf("proj%d", e%10), Jobset: fmt.Sprintf("js%d", e/10%2)}}
		for i := 0; i < perEval; i++ {
			sb := benchSubmit(fmt.Sprintf("e%d-%d", e, i))
			sb.Build.Job = fmt.Sprintf("job%d", i)
			m.Builds = append(m.Builds, sb)
		}
		cmd, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_CREATE_EVAL, m, 0)
		if err != nil {
			b.Fatal(err)
		}
		res, err := c.Apply(ctx, cmd)
		if err != nil || res.Results[0].Err != nil {
			b.Fatalf("eval %d: %v %v", e, err, res)
		}
		if e%2 == 1 {
			if err := c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_CANCEL_EVAL, &pb.CancelEval{Id: res.Results[0].ID}); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// latencies runs requests from workers goroutines over one keep-alive
// client and returns the sorted latencies.
func latencies(b *testing.B, workers, total int, url func(r *rand.Rand) string) []time.Duration {
	b.Helper()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	var mu sync.Mutex
	var out []time.Duration
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 7))
			var mine []time.Duration
			for i := 0; i < total/workers; i++ {
				u := url(r)
				start := time.Now()
				resp, err := client.Get(u)
				if err != nil {
					b.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				mine = append(mine, time.Since(start))
				if resp.StatusCode != http.StatusOK {
					b.Errorf("GET %s: %d", u, resp.StatusCode)
					return
				}
			}
			mu.Lock()
			out = append(out, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	slices.Sort(out)
	return out
}

func pct(d []time.Duration, p float64) float64 {
	if len(d) == 0 {
		return 0
	}
	return float64(d[min(len(d)-1, int(float64(len(d))*p))].Microseconds()) / 1000
}

// BenchmarkAPIListGet: with 100,000 builds in state, the p50/p99 latency
// in ms of list endpoints (pages of 100) and get endpoints over loopback
// HTTP with 4 concurrent clients, next to /health measured in the same run.
func BenchmarkAPIListGet(b *testing.B) {
	const builds = 100_000
	tc := startCluster(b, 1)
	_, c := tc.leader(10 * time.Second)
	fillBuilds(b, c, builds)
	base := "http://" + c.HTTPAddr()
	endpoints := []struct {
		name string
		url  func(r *rand.Rand) string
	}{
		{"health", func(*rand.Rand) string { return base + "/health" }},
		{"list-all", func(r *rand.Rand) string {
			return fmt.Sprintf("%s/api/v1/builds?per_page=100&page=%d", base, 1+r.IntN(builds/100))
		}},
		{"list-jobset", func(r *rand.Rand) string {
			return fmt.Sprintf("%s/api/v1/builds?project=proj%d&jobset=js%d&per_page=100&page=%d", base, r.IntN(10), r.IntN(2), 1+r.IntN(50))
		}},
		{"list-status", func(r *rand.Rand) string {
			return fmt.Sprintf("%s/api/v1/builds?status=cancelled&per_page=100&page=%d", base, 1+r.IntN(500))
		}},
		{"list-queued-system", func(r *rand.Rand) string {
			return fmt.Sprintf("%s/api/v1/builds?finished=false&system=x86_64-linux&per_page=100&page=%d", base, 1+r.IntN(500))
		}},
		{"list-evals", func(r *rand.Rand) string {
			return fmt.Sprintf("%s/api/v1/evaluations?per_page=100&page=%d", base, 1+r.IntN(1))
		}},
		{"get-build", func(r *rand.Rand) string { return fmt.Sprintf("%s/api/v1/builds/%d", base, 1+r.IntN(builds)) }},
		{"hydra-build", func(r *rand.Rand) string { return fmt.Sprintf("%s/build/%d", base, 1+r.IntN(builds)) }},
		{"hydra-latest", func(r *rand.Rand) string {
			return fmt.Sprintf("%s/job/proj%d/js%d/job%d/shield", base, 2*r.IntN(5)+1, r.IntN(2), r.IntN(1000)) // odd projects have finished builds
		}},
		{"hydra-evals", func(r *rand.Rand) string {
			return fmt.Sprintf("%s/jobset/proj%d/js%d/evals", base, r.IntN(10), r.IntN(2))
		}},
	}
	results := map[string][]time.Duration{}
	for b.Loop() {
		for _, e := range endpoints {
			results[e.name] = latencies(b, 4, 400, e.url)
		}
	}
	for _, e := range endpoints {
		d := results[e.name]
		b.ReportMetric(pct(d, 0.50), e.name+"-p50-ms")
		b.ReportMetric(pct(d, 0.99), e.name+"-p99-ms")
	}
}
