package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/kilnci/kiln/agent"
	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/internal/benchnar"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// benchAgents registers n agents through one client and returns their credentials.
func benchAgents(b *testing.B, client kilnv1connect.AgentServiceClient, n int) []string {
	b.Helper()
	creds := make([]string, n)
	runConcurrent(b, 32, n, func(i int) error {
		resp, err := client.Register(context.Background(), req(&kilnv1.RegisterRequest{Name: fmt.Sprint("bench", i), Systems: []string{"x86_64-linux"}, MaxJobs: 1}, testAgentToken))
		if err != nil {
			return err
		}
		creds[i] = resp.Msg.Credential
		return nil
	})
	return creds
}

// queueSteps submits builds of 1,000 independent leaves each (plus a top
// that waits for them) until n steps are runnable.
func queueSteps(b *testing.B, c *Coordinator, n int) {
	b.Helper()
	for made := 0; made < n; made += 1000 {
		top := &pb.DerivationNode{DrvPath: storePathFor(fmt.Sprintf("top-%d.drv", made)), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePathFor(fmt.Sprint("top-", made))}}}
		graph := []*pb.DerivationNode{top}
		for i := made; i < made+1000 && i < n; i++ {
			leaf := &pb.DerivationNode{DrvPath: storePathFor(fmt.Sprintf("leaf-%d.drv", i)), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePathFor(fmt.Sprint("leaf-", i))}}}
			top.InputDrvs = append(top.InputDrvs, leaf.DrvPath)
			graph = append(graph, leaf)
		}
		if _, err := c.SubmitBuild(context.Background(), &pb.SubmitBuild{Build: &pb.Build{DrvPath: top.DrvPath}, Graph: graph}); err != nil {
			b.Fatal(err)
		}
	}
}

func benchClient(addr string) kilnv1connect.AgentServiceClient {
	return kilnv1connect.NewAgentServiceClient(rpc.NewHTTPClient(2048), "http://"+addr)
}

// leaseBench is a 3-node loopback cluster with queued runnable steps and
// 1,000 registered agents whose connections to the leader are open.
type leaseBench struct {
	tc     *testCluster
	leader *Coordinator
	client kilnv1connect.AgentServiceClient
	creds  []string
	credOf map[string]string // agent id -> credential
}

func newLeaseBench(b *testing.B, queued int) *leaseBench {
	tc := startCluster(b, 3, withAgents, withDefaultRaftTimeouts, func(_ int, cfg *Config) { cfg.LeaseTTL = 10 * time.Minute })
	_, l := tc.leader(10 * time.Second)
	queueSteps(b, l, queued)
	lb := &leaseBench{tc: tc, leader: l, client: benchClient(l.HTTPAddr())}
	lb.settle()
	lb.creds = benchAgents(b, lb.client, 1000)
	lb.credOf = map[string]string{}
	for _, c := range lb.creds {
		id, _, _ := strings.Cut(c, ".")
		lb.credOf[id] = c
	}
	lb.openConns(b)
	return lb
}

// openConns gives every agent an open connection to the leader (one
// Heartbeat each, all at once), so a timed window starts as a farm runs:
// agents keep their connections between polls. Cancelling an HTTP/1.1 call
// in flight closes its connection, so a round ended by cancelling the
// agents' polls would otherwise time 1,000 dials in the next.
func (lb *leaseBench) openConns(b *testing.B) {
	runConcurrent(b, len(lb.creds), len(lb.creds), func(i int) error {
		_, err := lb.client.Heartbeat(context.Background(), req(&kilnv1.HeartbeatRequest{}, lb.creds[i]))
		return err
	})
}

// settle waits until every node applied what the leader has.
func (lb *leaseBench) settle() {
	lb.tc.waitFor(2*time.Minute, "every node applied the leader's log", func() bool {
		for _, c := range lb.tc.nodes {
			if c.AppliedIndex() < lb.leader.AppliedIndex() {
				return false
			}
		}
		return true
	})
}

// poll runs every agent's long-poll loop (one free slot) until ctx ends,
// giving each answer to got, and waits for the loops to end.
func (lb *leaseBench) poll(ctx context.Context, got func(cred string, resp *kilnv1.LeaseResponse, err error)) {
	var wg sync.WaitGroup
	for _, cred := range lb.creds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				resp, err := lb.client.Lease(ctx, req(&kilnv1.LeaseRequest{FreeSlots: 1, WaitSeconds: 5}, cred))
				if err != nil {
					got(cred, nil, err)
					continue
				}
				got(cred, resp.Msg, nil)
			}
		}()
	}
	wg.Wait()
}

func (lb *leaseBench) release(ctx context.Context, cred string, id uint64) error {
	_, err := lb.client.Complete(ctx, req(&kilnv1.CompleteRequest{LeaseId: id, Outcome: kilnv1.Outcome_OUTCOME_RELEASED}, cred))
	return err
}

// BenchmarkLeaseGrants: lease grants/s with 1,000 fake agents long-polling
// the leader over real sockets, with 1k and with 100k queued steps. In each
// of benchLeaseRounds rounds every agent polls (Lease, one free slot) until
// 900 leases have been granted; the clock runs from the first poll to the
// 900th grant. Between rounds (untimed) the leases are handed back
// (RELEASED), so every round starts from the same queue, and every agent's
// connection is opened again (openConns).
func BenchmarkLeaseGrants(b *testing.B) {
	for _, queued := range []int{1000, 100000} {
		b.Run(fmt.Sprintf("queued=%d", queued), func(b *testing.B) {
			lb := newLeaseBench(b, queued)
			const target = 900
			var total time.Duration
			var perRound []float64
			stopProfile := benchProfile(b, fmt.Sprint("grants-", queued))
			for round := 0; round < benchLeaseRounds; round++ {
				var granted atomic.Int64
				var elapsed atomic.Int64
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				start := time.Now()
				lb.poll(ctx, func(_ string, resp *kilnv1.LeaseResponse, err error) {
					if err != nil {
						return
					}
					n := int64(len(resp.Leases))
					if n > 0 && granted.Add(n) >= target && granted.Load()-n < target {
						elapsed.Store(int64(time.Since(start)))
						cancel()
					}
				})
				cancel()
				if elapsed.Load() == 0 {
					b.Fatalf("round %d: only %d grants in a minute", round, granted.Load())
				}
				d := time.Duration(elapsed.Load())
				total += d
				perRound = append(perRound, target/d.Seconds())
				// Untimed: hand every lease back (those whose answer the
				// cancellation cut off too) and let the followers catch up.
				lb.settle()
				leases, err := lb.leader.FSM().Read().Leases()
				if err != nil {
					b.Fatal(err)
				}
				runConcurrent(b, 64, len(leases), func(i int) error {
					return lb.release(context.Background(), lb.credOf[leases[i].AgentId], leases[i].Id)
				})
				lb.settle()
				lb.openConns(b)
			}
			stopProfile()
			slices.Sort(perRound)
			b.ReportMetric(float64(target*benchLeaseRounds)/total.Seconds(), "grants/s")
			b.ReportMetric(perRound[0], "min-round-grants/s")
			b.ReportMetric(perRound[len(perRound)-1], "max-round-grants/s")
		})
	}
}

const benchLeaseRounds = 10

// BenchmarkLeaseCycle: the steady state of the same set-up. Each agent
// hands every lease it gets straight back (Complete, RELEASED: the step is
// runnable again), as a finished build frees its slot, so each grant also
// costs a completion through Raft. After a warm-up second, grants are
// counted over benchLeaseWindow.
func BenchmarkLeaseCycle(b *testing.B) {
	for _, queued := range []int{1000, 100000} {
		b.Run(fmt.Sprintf("queued=%d", queued), func(b *testing.B) {
			lb := newLeaseBench(b, queued)
			var counting atomic.Bool
			var granted, failed atomic.Int64
			var firstErr atomic.Value
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan struct{})
			go func() {
				defer close(done)
				lb.poll(ctx, func(cred string, resp *kilnv1.LeaseResponse, err error) {
					if err != nil {
						if ctx.Err() == nil {
							failed.Add(1)
							firstErr.CompareAndSwap(nil, err)
						}
						return
					}
					if counting.Load() {
						granted.Add(int64(len(resp.Leases)))
					}
					for _, ls := range resp.Leases {
						if err := lb.release(ctx, cred, ls.LeaseId); err != nil && ctx.Err() == nil {
							failed.Add(1)
							firstErr.CompareAndSwap(nil, err)
						}
					}
				})
			}()
			time.Sleep(time.Second) // warm-up: every agent is in its loop
			stopProfile := benchProfile(b, fmt.Sprint("cycle-", queued))
			counting.Store(true)
			start := time.Now()
			time.Sleep(benchLeaseWindow)
			counting.Store(false)
			elapsed := time.Since(start)
			stopProfile()
			cancel()
			<-done
			if granted.Load() == 0 {
				b.Fatal("no lease granted")
			}
			if err := firstErr.Load(); err != nil {
				b.Logf("%d calls failed, the first: %v", failed.Load(), err)
			}
			b.ReportMetric(float64(granted.Load())/elapsed.Seconds(), "grants/s")
			b.ReportMetric(float64(failed.Load()), "failed-calls")
		})
	}
}

const benchLeaseWindow = 5 * time.Second

// benchProfile writes a CPU profile and an execution trace (go tool trace;
// its -pprof=sched|syscall views show goroutines waiting for a P or in
// system calls) of a benchmark's measured window when KILN_BENCH_PROFILE
// names a directory (go test's -cpuprofile would cover the set-up too);
// it returns the function that stops them.
func benchProfile(b *testing.B, name string) func() {
	dir := os.Getenv("KILN_BENCH_PROFILE")
	if dir == "" {
		return func() {}
	}
	f, err := os.Create(filepath.Join(dir, name+".prof"))
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		b.Fatal(err)
	}
	tf, err := os.Create(filepath.Join(dir, name+".trace"))
	if err != nil {
		b.Fatal(err)
	}
	if err := trace.Start(tf); err != nil {
		b.Fatal(err)
	}
	write := func(profile, suffix string) {
		af, err := os.Create(filepath.Join(dir, name+suffix))
		if err != nil {
			b.Fatal(err)
		}
		defer af.Close()
		if err := pprof.Lookup(profile).WriteTo(af, 0); err != nil {
			b.Fatal(err)
		}
	}
	// Allocations and lock contention: before and after (pprof -base).
	runtime.SetMutexProfileFraction(5)
	write("allocs", ".allocs0")
	write("mutex", ".mutex0")
	return func() {
		trace.Stop()
		_ = tf.Close()
		pprof.StopCPUProfile()
		_ = f.Close()
		write("allocs", ".allocs1")
		write("mutex", ".mutex1")
		runtime.SetMutexProfileFraction(0)
	}
}

// BenchmarkSubmitToLease: with 100 idle agents long-polling, the time from
// submitting a one-step build to an agent holding its lease.
func BenchmarkSubmitToLease(b *testing.B) {
	tc := startCluster(b, 3, withAgents, func(_ int, cfg *Config) { cfg.LeaseTTL = 10 * time.Minute })
	_, l := tc.leader(10 * time.Second)
	client := benchClient(l.HTTPAddr())
	creds := benchAgents(b, client, 100)
	got := make(chan time.Time, 16)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, cred := range creds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				resp, err := client.Lease(ctx, req(&kilnv1.LeaseRequest{FreeSlots: 1, WaitSeconds: 30}, cred))
				if err == nil && len(resp.Msg.Leases) > 0 {
					got <- time.Now()
				}
			}
		}()
	}
	// Let every agent park its poll.
	tc.waitFor(10*time.Second, "100 parked polls", func() bool { return len(l.live().agents) >= 100 })
	const rounds = 300
	var lat []time.Duration
	for i := 0; i < rounds; i++ {
		n := &pb.DerivationNode{DrvPath: storePathFor(fmt.Sprintf("lat-%d.drv", i)), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePathFor(fmt.Sprint("lat-", i))}}}
		t0 := time.Now()
		if _, err := l.SubmitBuild(context.Background(), &pb.SubmitBuild{Build: &pb.Build{DrvPath: n.DrvPath}, Graph: []*pb.DerivationNode{n}}); err != nil {
			b.Fatal(err)
		}
		select {
		case t1 := <-got:
			lat = append(lat, t1.Sub(t0))
		case <-time.After(10 * time.Second):
			b.Fatal("no agent got the lease")
		}
	}
	cancel()
	wg.Wait()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

// BenchmarkNarIngest: NAR ingest (zstd compress + upload + verify + store +
// replicate to a quorum + commit) in MB/s of NAR, next to `zstd -3 -T2` on
// the same NAR in the same run.
func BenchmarkNarIngest(b *testing.B) {
	tc := startCluster(b, 3, withCacheKey(b), withAgents, func(_ int, cfg *Config) { cfg.LeaseTTL = 10 * time.Minute })
	_, l := tc.leader(10 * time.Second)
	client := benchClient(l.HTTPAddr())
	cred := benchAgents(b, client, 1)[0]
	benchnar.Ingest{
		Client: client, Credential: cred,
		// The CPU figure is this process's: the agent and all three
		// coordinators.
		Profile: func() func() { return benchProfile(b, "ingest") },
		Lease: func(round int) (uint64, string) {
			out := storePathFor(fmt.Sprint("ingest-", round))
			n := &pb.DerivationNode{DrvPath: storePathFor(fmt.Sprintf("ingest-%d.drv", round)), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: out}}}
			if _, err := l.SubmitBuild(context.Background(), &pb.SubmitBuild{Build: &pb.Build{DrvPath: n.DrvPath}, Graph: []*pb.DerivationNode{n}}); err != nil {
				b.Fatal(err)
			}
			resp, err := client.Lease(context.Background(), req(&kilnv1.LeaseRequest{FreeSlots: 1, WaitSeconds: 5}, cred))
			if err != nil || len(resp.Msg.Leases) != 1 {
				b.Fatalf("lease: %v", err)
			}
			return resp.Msg.Leases[0].LeaseId, out
		},
	}.Run(b)
}

// BenchmarkIngestPasses measures, one goroutine each, the passes over
// BenchmarkNarIngest's NAR that an upload costs in CPU: zstd with the
// agent's options (agent.NarEncoderOptions; and at the default level, with
// both file sizes, for comparison), SHA-256 of the compressed file (the
// receiving node), CRC-32C of the file (the sending node, once for all
// its peers, and each peer) and the NAR check (decompress, parse, SHA-256
// of the NAR; nar-sha256 is that hash alone). Their sum over two cores
// bounds an ingest on this machine, next to the zstd CLI's compression
// alone.
func BenchmarkIngestPasses(b *testing.B) {
	n, err := benchnar.NAR(64 << 20)
	if err != nil {
		b.Fatal(err)
	}
	var compress, compressDefault, narHash, fileHash, crc, check time.Duration
	var zst, zstDefault bytes.Buffer
	pack := func(buf *bytes.Buffer, level zstd.EncoderLevel) time.Duration {
		buf.Reset()
		t0 := time.Now()
		enc, err := zstd.NewWriter(buf, append(agent.NarEncoderOptions(), zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(level))...)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := enc.Write(n); err != nil {
			b.Fatal(err)
		}
		if err := enc.Close(); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	for b.Loop() {
		compress += pack(&zst, agent.NarLevel)
		compressDefault += pack(&zstDefault, zstd.SpeedDefault)
		t1 := time.Now()
		sha256.Sum256(n)
		t2 := time.Now()
		sha256.Sum256(zst.Bytes())
		t3 := time.Now()
		crc32.Checksum(zst.Bytes(), castagnoli)
		crc += time.Since(t3)
		t3 = time.Now()
		sum, err := cache.ReadNarZst(bytes.NewReader(zst.Bytes()), uint64(len(n)))
		if err != nil || sum.Size != uint64(len(n)) {
			b.Fatalf("check: %v (size %d)", err, sum.Size)
		}
		t4 := time.Now()
		narHash, fileHash, check = narHash+t2.Sub(t1), fileHash+t3.Sub(t2), check+t4.Sub(t3)
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(b.N) }
	b.ReportMetric(ms(compress), "compress-ms")
	b.ReportMetric(ms(compressDefault), "compress-default-ms")
	b.ReportMetric(float64(zstDefault.Len())/(1<<20), "file-default-MiB")
	b.ReportMetric(ms(narHash), "nar-sha256-ms")
	b.ReportMetric(ms(fileHash), "file-sha256-ms")
	b.ReportMetric(ms(crc), "file-crc32c-ms")
	b.ReportMetric(ms(check), "check-ms")
	b.ReportMetric(float64(zst.Len())/(1<<20), "file-MiB")
}
