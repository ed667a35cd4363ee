package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

const testAgentToken = "test-agent-join-token-0123"

func withAgents(_ int, cfg *Config) {
	cfg.AgentToken = testAgentToken
	cfg.LeaseTTL = 1500 * time.Millisecond
	cfg.LeasePollMax = 5 * time.Second
	cfg.RetryBackoff = time.Second
}

// fakeAgent speaks AgentService over a real socket.
type fakeAgent struct {
	t      *testing.T
	client kilnv1connect.AgentServiceClient
	cred   string
	id     string
}

func bearer(tok string) http.Header {
	h := http.Header{}
	h.Set("Authorization", "Bearer "+tok)
	return h
}

func req[T any](m *T, tok string) *connect.Request[T] {
	r := connect.NewRequest(m)
	r.Header().Set("Authorization", "Bearer "+tok)
	return r
}

func registerAgent(t *testing.T, addr string, features ...string) *fakeAgent {
	t.Helper()
	cl := kilnv1connect.NewAgentServiceClient(http.DefaultClient, "http://"+addr)
	resp, err := cl.Register(context.Background(), req(&kilnv1.RegisterRequest{Name: "fake", Systems: []string{"x86_64-linux"}, SupportedFeatures: features, MaxJobs: 2}, testAgentToken))
	if err != nil {
		t.Fatal(err)
	}
	return &fakeAgent{t: t, client: cl, cred: resp.Msg.Credential, id: resp.Msg.AgentId}
}

func (a *fakeAgent) lease(wait uint32) ([]*kilnv1.Lease, error) {
	resp, err := a.client.Lease(context.Background(), req(&kilnv1.LeaseRequest{FreeSlots: 1, WaitSeconds: wait}, a.cred))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Leases, nil
}

// upload sends an output as an agent does: header, then zstd chunks.
func (a *fakeAgent) upload(leaseID uint64, n testNar) error { return a.uploadChunks(leaseID, n, 100) }

// uploadChunks is upload with chunks of the given size.
func (a *fakeAgent) uploadChunks(leaseID uint64, n testNar, chunk int) error {
	d, _ := hex.DecodeString(n.blob)
	var narHash, narSize string
	for _, line := range strings.Split(n.narinfo, "\n") {
		if v, ok := strings.CutPrefix(line, "NarHash: "); ok {
			narHash = v
		}
		if v, ok := strings.CutPrefix(line, "NarSize: "); ok {
			narSize = v
		}
	}
	var size uint64
	for _, c := range narSize {
		size = size*10 + uint64(c-'0')
	}
	hdr := &kilnv1.NarHeader{LeaseId: leaseID, StorePath: n.path, NarHash: narHash, NarSize: size,
		FileHash: "sha256:" + nixbase32.EncodeToString(d), FileSize: uint64(len(n.zst))}
	parts := []*kilnv1.UploadNarRequest{headerPart(hdr)}
	for off := 0; off < len(n.zst); off += chunk {
		parts = append(parts, chunkPart(n.zst[off:min(off+chunk, len(n.zst))]))
	}
	return a.sendParts(parts...)
}

func (a *fakeAgent) complete(leaseID uint64, o kilnv1.Outcome) error {
	_, err := a.client.Complete(context.Background(), req(&kilnv1.CompleteRequest{LeaseId: leaseID, Outcome: o}, a.cred))
	return err
}

func (a *fakeAgent) log(leaseID uint64, lines ...string) error {
	stream := a.client.StreamLog(context.Background())
	stream.RequestHeader().Set("Authorization", "Bearer "+a.cred)
	for i, l := range lines {
		if err := stream.Send(&kilnv1.LogChunk{LeaseId: leaseID, Seq: uint64(i), Data: []byte(l), Last: i == len(lines)-1}); err != nil {
			break
		}
	}
	_, err := stream.CloseAndReceive()
	return err
}

func codeOf(err error) connect.Code {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Code()
	}
	return 0
}

// agentGraph: top needs dep; outputs named so makeNar can produce them.
func agentGraph() *pb.SubmitBuild {
	dep := &pb.DerivationNode{DrvPath: storePathFor("dep.drv"), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePathFor("dep")}}}
	top := &pb.DerivationNode{DrvPath: storePathFor("top.drv"), System: "x86_64-linux", InputDrvs: []string{dep.DrvPath}, Outputs: []*pb.Output{{Name: "out", Path: storePathFor("top")}}}
	return &pb.SubmitBuild{Build: &pb.Build{DrvPath: top.DrvPath, Project: "p", Jobset: "j", Job: "top"}, Graph: []*pb.DerivationNode{top, dep}}
}

// TestAgentProtocol: agents on a follower register, long-poll, upload,
// stream logs and complete; the build finishes; stale leases and missing
// credentials are refused and change nothing.
func TestAgentProtocol(t *testing.T) {
	tc := startCluster(t, 3, withCacheKey(t), withAgents)
	_, f := tc.follower()
	_, l := tc.leader(5 * time.Second)

	cl := kilnv1connect.NewAgentServiceClient(http.DefaultClient, "http://"+f.HTTPAddr())
	if _, err := cl.Register(context.Background(), req(&kilnv1.RegisterRequest{Systems: []string{"x86_64-linux"}, MaxJobs: 1}, "wrong-token")); codeOf(err) != connect.CodePermissionDenied {
		t.Errorf("register with a wrong join token: %v, want permission denied", err)
	}
	if _, err := cl.Lease(context.Background(), req(&kilnv1.LeaseRequest{FreeSlots: 1, WaitSeconds: 1}, "agent-x.nope")); codeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("lease with a bad credential: %v, want unauthenticated", err)
	}
	a := registerAgent(t, f.HTTPAddr())

	// The long-poll is answered as soon as work appears.
	got := make(chan []*kilnv1.Lease, 1)
	go func() {
		ls, err := a.lease(10)
		if err != nil {
			t.Errorf("lease: %v", err)
		}
		got <- ls
	}()
	start := time.Now()
	if _, err := l.SubmitBuild(context.Background(), agentGraph()); err != nil {
		t.Fatal(err)
	}
	var dep *kilnv1.Lease
	select {
	case ls := <-got:
		if len(ls) != 1 || ls[0].DrvPath != storePathFor("dep.drv") {
			t.Fatalf("leases %v, want the dep step", ls)
		}
		dep = ls[0]
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("submit-to-lease took %v", d)
		}
	case <-time.After(8 * time.Second):
		t.Fatal("the long-poll was not answered after the submission")
	}
	if len(dep.Substituters) != 1 || len(dep.Substituters[0].TrustedPublicKeys) != 1 {
		t.Errorf("lease names substituters %v, want the cluster cache and its key", dep.Substituters)
	}

	// Success needs the outputs in the cache.
	if err := a.complete(dep.LeaseId, kilnv1.Outcome_OUTCOME_SUCCEEDED); codeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("completion before upload: %v, want failed precondition", err)
	}
	// An output that is not the step's is refused.
	if err := a.upload(dep.LeaseId, makeNar(t, "not-an-output", nil)); codeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("upload of a foreign path: %v, want invalid argument", err)
	}
	// So is a chunk over 1 MiB, and nothing of it is kept.
	big := makeNar(t, "dep", nil)
	big.zst = bytes.Repeat([]byte("z"), 1<<20+1)
	sum := sha256.Sum256(big.zst)
	big.blob = hex.EncodeToString(sum[:])
	if err := a.uploadChunks(dep.LeaseId, big, len(big.zst)); codeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("upload with a 1 MiB + 1 byte chunk: %v, want resource exhausted", err)
	}
	if _, err := l.fsm.Read().NarInfo(raftfsm.HashPart(big.path)); !errors.Is(err, raftfsm.ErrNotFound) {
		t.Errorf("narinfo after the refused upload: %v, want not found", err)
	}
	if l.blobs.Has(big.blob) {
		t.Error("the refused upload's blob was stored")
	}
	if err := a.log(dep.LeaseId, "building dep\n", "done\n"); err != nil {
		t.Fatal(err)
	}
	if err := a.upload(dep.LeaseId, makeNar(t, "dep", nil)); err != nil {
		t.Fatalf("upload: %v", err)
	}
	if err := a.complete(dep.LeaseId, kilnv1.Outcome_OUTCOME_SUCCEEDED); err != nil {
		t.Fatal(err)
	}
	// A repeated completion is a no-op.
	if err := a.complete(dep.LeaseId, kilnv1.Outcome_OUTCOME_SUCCEEDED); err != nil && codeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("repeated completion: %v", err)
	}
	st, body := httpDo(t, http.MethodGet, "http://"+f.HTTPAddr()+"/cache/log/"+strings.TrimPrefix(storePathFor("dep.drv"), "/nix/store/"), "", nil)
	tc.waitFor(5*time.Second, "the log through the cache", func() bool {
		st, body = httpDo(t, http.MethodGet, "http://"+f.HTTPAddr()+"/cache/log/"+strings.TrimPrefix(storePathFor("dep.drv"), "/nix/store/"), "", nil)
		return st == http.StatusOK
	})
	if string(body) != "building dep\ndone\n" {
		t.Errorf("stored log %q", body)
	}

	// The dependent is runnable now. This lease is left without heartbeats:
	// it expires, and the late completion and upload are refused.
	ls, err := a.lease(5)
	if err != nil || len(ls) != 1 || ls[0].DrvPath != storePathFor("top.drv") {
		t.Fatalf("second lease %v %v, want top", ls, err)
	}
	stale := ls[0]
	if err := a.log(stale.LeaseId, "partial\n"); err != nil {
		t.Fatal(err)
	}
	tc.waitFor(10*time.Second, "the unheartbeated lease expires", func() bool {
		s, err := f.Read().Step(stale.DrvPath)
		return err == nil && s.Tries == 1 && s.LeaseId == 0
	})
	if err := a.upload(stale.LeaseId, makeNar(t, "top", nil)); codeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("upload under an expired lease: %v, want failed precondition", err)
	}
	if _, err := f.Read().NarInfo(strings.TrimPrefix(storePathFor("top"), "/nix/store/")[:32]); err == nil {
		t.Errorf("an upload under an expired lease was recorded")
	}
	if err := a.complete(stale.LeaseId, kilnv1.Outcome_OUTCOME_SUCCEEDED); codeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("completion under an expired lease: %v, want failed precondition", err)
	}

	// Re-leased after its backoff, heartbeated, built: the build finishes.
	var top *kilnv1.Lease
	tc.waitFor(10*time.Second, "the step is leased again", func() bool {
		ls, err := a.lease(2)
		if err == nil && len(ls) == 1 {
			top = ls[0]
		}
		return top != nil
	})
	if top.Attempt != 2 {
		t.Errorf("attempt %d, want 2", top.Attempt)
	}
	hb, err := a.client.Heartbeat(context.Background(), req(&kilnv1.HeartbeatRequest{LeaseIds: []uint64{top.LeaseId, stale.LeaseId}}, a.cred))
	if err != nil {
		t.Fatal(err)
	}
	if len(hb.Msg.CancelLeaseIds) != 1 || hb.Msg.CancelLeaseIds[0] != stale.LeaseId {
		t.Errorf("heartbeat cancels %v, want only the expired lease %d", hb.Msg.CancelLeaseIds, stale.LeaseId)
	}
	if err := a.upload(top.LeaseId, makeNar(t, "top", nil)); err != nil {
		t.Fatal(err)
	}
	if err := a.log(top.LeaseId, "second attempt\n"); err != nil {
		t.Fatal(err)
	}
	if err := a.complete(top.LeaseId, kilnv1.Outcome_OUTCOME_SUCCEEDED); err != nil {
		t.Fatal(err)
	}
	tc.waitFor(5*time.Second, "the build finished on the follower", func() bool {
		b, err := f.Read().Build(1)
		return err == nil && b.State == pb.BuildState_BUILD_STATE_FINISHED
	})
	if b, _ := f.Read().Build(1); b.BuildStatus != 0 || len(b.Outputs) != 1 {
		t.Errorf("build = %v; want status 0 with its output", b)
	}
	// Each attempt keeps its log; the expired one is marked incomplete.
	var attempts []string
	tc.waitFor(5*time.Second, "both attempts' logs", func() bool {
		logs, _ := f.Read().Logs(top.DrvPath)
		attempts = attempts[:0]
		for _, lr := range logs {
			attempts = append(attempts, fmt.Sprintf("%d:%v:%d", lr.Attempt, lr.Incomplete, lr.Size))
		}
		return len(logs) == 2
	})
	if d := cmp.Diff([]string{"1:true:8", "2:false:15"}, attempts); d != "" {
		t.Errorf("log records (-want +got):\n%s", d)
	}

	// Cancelling a build tells the agent holding its step, on its next
	// heartbeat, to stop.
	lone := &pb.DerivationNode{DrvPath: storePathFor("lone.drv"), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePathFor("lone")}}}
	cb, err := l.SubmitBuild(context.Background(), &pb.SubmitBuild{Build: &pb.Build{DrvPath: lone.DrvPath}, Graph: []*pb.DerivationNode{lone}})
	if err != nil {
		t.Fatal(err)
	}
	ls, err = a.lease(5)
	if err != nil || len(ls) != 1 || ls[0].DrvPath != lone.DrvPath {
		t.Fatalf("lease %v %v, want the lone step", ls, err)
	}
	if _, err := l.CancelBuild(context.Background(), cb.Id, "test"); err != nil {
		t.Fatal(err)
	}
	hb, err = a.client.Heartbeat(context.Background(), req(&kilnv1.HeartbeatRequest{LeaseIds: []uint64{ls[0].LeaseId}}, a.cred))
	if err != nil {
		t.Fatal(err)
	}
	if len(hb.Msg.CancelLeaseIds) != 1 || hb.Msg.CancelLeaseIds[0] != ls[0].LeaseId {
		t.Errorf("after cancelling, heartbeat cancels %v, want %d", hb.Msg.CancelLeaseIds, ls[0].LeaseId)
	}
}

// TestLeaseCountsFromGrant: a lease committed before the leader has
// recorded its start (grant records it only once its Apply returns, and
// the expiry loop may look in between) gets the full TTL from then, not
// from the leadership start. This expired fresh leases at once: a CI run
// of TestAgentProtocol under -race lost its re-leased step that way.
func TestLeaseCountsFromGrant(t *testing.T) {
	tc := startCluster(t, 3, withAgents)
	_, l := tc.leader(5 * time.Second)
	live := l.live()
	if live == nil {
		t.Fatal("the leader has no liveness state")
	}
	ttl := l.cfg.LeaseTTL
	// Leadership older than a TTL: counting from its start would expire
	// the lease on the loop's next look.
	time.Sleep(time.Until(live.since.Add(ttl + 100*time.Millisecond)))

	a := registerAgent(t, l.HTTPAddr())
	if _, err := l.SubmitBuild(context.Background(), agentGraph()); err != nil {
		t.Fatal(err)
	}
	dep := storePathFor("dep.drv")
	cmd, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_GRANT_LEASE, &pb.GrantLease{AgentId: a.id, DrvPath: dep, TtlSeconds: 1}, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Committed directly, as a grant whose start is not yet recorded.
	res, err := l.Apply(context.Background(), cmd)
	if err != nil || res.Results[0].Err != nil {
		t.Fatalf("grant: %v %v", err, res)
	}
	granted, id := time.Now(), res.Results[0].ID
	held := func() bool {
		s, err := l.Read().Step(dep)
		return err == nil && s.LeaseId == id
	}
	// Several of the loop's looks (one every TTL/10) fall in this window.
	for time.Since(granted) < ttl*2/3 {
		if !held() {
			t.Fatalf("the lease was expired %v after its grant, within its TTL of %v", time.Since(granted).Round(time.Millisecond), ttl)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Without heartbeats it does expire, and its start is forgotten.
	tc.waitFor(10*time.Second, "the unheartbeated lease expires", func() bool { return !held() })
	tc.waitFor(5*time.Second, "the expired lease's start is dropped", func() bool {
		live.mu.Lock()
		defer live.mu.Unlock()
		_, ok := live.leases[id]
		return !ok
	})
}

// TestStalledBodyIsEnded: a request body (an agent's upload or log
// stream) that stops sending is cut off after the idle timeout, over a
// real socket, while a slow but steady one is not.
func TestStalledBodyIsEnded(t *testing.T) {
	got := make(chan error, 1)
	h := idleReads(300*time.Millisecond, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := io.Copy(io.Discard, r.Body)
		got <- err
	}))
	srv := httptest.NewServer(h)
	defer srv.Close()
	tests := []struct {
		name    string
		pauses  []time.Duration
		wantErr bool
	}{
		{"steady", []time.Duration{100 * time.Millisecond, 100 * time.Millisecond, 100 * time.Millisecond, 100 * time.Millisecond, 100 * time.Millisecond}, false},
		{"stalled", []time.Duration{50 * time.Millisecond, 2 * time.Second}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pr, pw := io.Pipe()
			go func() {
				for _, p := range tt.pauses {
					if _, err := pw.Write([]byte("chunk")); err != nil {
						return
					}
					time.Sleep(p) // the client's pace is what is under test
				}
				pw.Close()
			}()
			req, _ := http.NewRequest(http.MethodPost, srv.URL, pr)
			go func() {
				if resp, err := http.DefaultClient.Do(req); err == nil {
					resp.Body.Close()
				}
			}()
			select {
			case err := <-got:
				if (err != nil) != tt.wantErr {
					t.Errorf("handler's read error %v, want error %v", err, tt.wantErr)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the handler never finished reading")
			}
		})
	}
}
