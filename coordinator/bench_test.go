package coordinator

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// runConcurrent runs total operations over workers goroutines and returns ops/s.
func runConcurrent(b *testing.B, workers, total int, op func(i int) error) float64 {
	b.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= total {
					return
				}
				if err := op(i); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := firstErr.Load(); err != nil {
		b.Fatal(err)
	}
	return float64(total) / time.Since(start).Seconds()
}

// BenchmarkSubmitVsRawRaft measures, in the same run on one 3-node loopback
// cluster with 64 concurrent writers: raw no-op Raft commits/s (one
// raft.Apply per command) and committed build submissions/s through the
// coordinator's write path (group commit: many commands per entry), on the
// leader and through a follower (forwarded over Connect).
func BenchmarkSubmitVsRawRaft(b *testing.B) {
	const workers, total = 64, 20000
	tc := startCluster(b, 3)
	_, leader := tc.leader(10 * time.Second)
	_, follower := tc.follower()
	noop, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_NOOP, &pb.Noop{}, 0)
	if err != nil {
		b.Fatal(err)
	}
	noopEntry, err := raftfsm.EncodeEntry([]*pb.Command{noop})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	// The machine's disk and CPUs are shared and their speed drifts, so the
	// raw and the submission runs alternate, three of each, and the medians
	// are compared.
	const rounds = 3
	var raws, subs, perEntry []float64
	var subFollower float64
	for b.Loop() {
		for round := range rounds {
			raws = append(raws, runConcurrent(b, workers, total, func(int) error {
				return leader.Raft().Apply(noopEntry, 10*time.Second).Error()
			}))
			stopProfile := func() {}
			if round == rounds-1 {
				stopProfile = benchProfile(b, "submit")
			}
			first := leader.Raft().LastIndex()
			subs = append(subs, runConcurrent(b, workers, total, func(i int) error {
				_, err := leader.SubmitBuild(ctx, benchSubmit(fmt.Sprintf("l%d-%d", round, i)))
				return err
			}))
			perEntry = append(perEntry, float64(total)/float64(leader.Raft().LastIndex()-first))
			stopProfile()
		}
		subFollower = runConcurrent(b, workers, total/4, func(i int) error {
			_, err := follower.SubmitBuild(ctx, benchSubmit(fmt.Sprintf("f-%d", i)))
			return err
		})
	}
	raw, sub := median(raws), median(subs)
	b.Logf("raw no-op commits/s %.0f, submissions/s %.0f, submissions per entry %.1f", raws, subs, perEntry)
	b.ReportMetric(raw, "raw-noop-commits/s")
	b.ReportMetric(sub, "submits/s")
	b.ReportMetric(subFollower, "follower-submits/s")
	b.ReportMetric(sub/raw, "ratio")
	b.ReportMetric(median(perEntry), "submits/entry")
}

// median of a non-empty list.
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func benchSubmit(name string) *pb.SubmitBuild {
	dep := storePath("dep-" + name + ".drv")
	top := storePath("top-" + name + ".drv")
	return &pb.SubmitBuild{
		Build: &pb.Build{DrvPath: top},
		Graph: []*pb.DerivationNode{
			{DrvPath: dep, System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePath("dep-" + name)}}},
			{DrvPath: top, System: "x86_64-linux", InputDrvs: []string{dep}, Outputs: []*pb.Output{{Name: "out", Path: storePath("top-" + name)}}},
		},
	}
}
