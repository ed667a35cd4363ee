package coordinator

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/go-memdb"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
	"github.com/kilnci/kiln/web"
)

// agentService implements kiln.v1.AgentService on the leader; followers
// proxy AgentService calls to it (leaderProxy).
type agentService struct{ c *Coordinator }

var _ kilnv1connect.AgentServiceHandler = agentService{}

// liveness is the leader's memory of agents and leases: heartbeats never go
// through Raft. A new leader starts empty, which gives every lease a fresh
// TTL from the moment it took over.
type liveness struct {
	mu     sync.Mutex
	since  time.Time            // leadership start
	leases map[uint64]time.Time // last heartbeat per lease
	agents map[string]time.Time // last call per agent
	logs   map[uint64]*leaseLog // live logs by lease
	// gossipGone: agents the pool declared dead or gone, and since when.
	gossipGone map[string]time.Time
	// wake and expiryWake nudge the leader's membership and expiry loops.
	wake, expiryWake chan struct{}

	// grantMu guards granting, the steps with a grant in flight. A poll
	// picks and claims its steps under it, so two polls never pick the
	// same step; heartbeats and the other liveness records do not wait
	// on it.
	grantMu  sync.Mutex
	granting map[string]bool

	fairMu    sync.Mutex
	fair      *raftfsm.FairShare
	fairIndex uint64
}

type leaseLog struct {
	buf       bytes.Buffer
	nextSeq   uint64
	truncated bool
	done      bool
}

func newLiveness() *liveness {
	return &liveness{since: time.Now(), leases: map[uint64]time.Time{}, agents: map[string]time.Time{},
		granting: map[string]bool{}, logs: map[uint64]*leaseLog{}, gossipGone: map[string]time.Time{},
		wake: make(chan struct{}, 1), expiryWake: make(chan struct{}, 1)}
}

func (l *liveness) nudge() {
	for _, ch := range []chan struct{}{l.wake, l.expiryWake} {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// fairShare is the jobsets' use of the farm, recomputed when the state moved.
func (l *liveness) fairShare(r *raftfsm.Reader, index uint64) (*raftfsm.FairShare, error) {
	l.fairMu.Lock()
	defer l.fairMu.Unlock()
	if l.fair != nil && l.fairIndex == index {
		return l.fair, nil
	}
	f, err := r.FairShare()
	if err != nil {
		return nil, err
	}
	l.fair, l.fairIndex = f, index
	return f, nil
}

func (l *liveness) touchAgent(id string) {
	l.mu.Lock()
	l.agents[id] = time.Now()
	l.mu.Unlock()
}

// agentCredential splits "Bearer <agent id>.<secret>".
func agentCredential(h http.Header) (id, secret string, ok bool) {
	tok, ok := rpc.BearerToken(h)
	if !ok {
		return "", "", false
	}
	return strings.Cut(tok, ".")
}

// authAgent resolves the calling agent from its credential.
func (c *Coordinator) authAgent(h http.Header) (*pb.Agent, error) {
	id, secret, ok := agentCredential(h)
	if !ok {
		return nil, fmt.Errorf("%w: missing agent credential", raftfsm.ErrUnauthenticated)
	}
	a, err := c.fsm.Read().Agent(id)
	if errors.Is(err, raftfsm.ErrNotFound) {
		return nil, fmt.Errorf("%w: unknown agent", raftfsm.ErrUnauthenticated)
	}
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(secret))
	if subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), []byte(a.CredentialSha256)) != 1 {
		return nil, fmt.Errorf("%w: agent credential not accepted", raftfsm.ErrUnauthenticated)
	}
	if c.live() != nil {
		c.live().touchAgent(a.Id)
	}
	return a, nil
}

func (c *Coordinator) live() *liveness { return c.liveness.Load() }

func sortedUnique(xs []string) []string {
	out := slices.Clone(xs)
	slices.Sort(out)
	return slices.Compact(out)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (s agentService) Register(ctx context.Context, req *connect.Request[kilnv1.RegisterRequest]) (*connect.Response[kilnv1.RegisterResponse], error) {
	c := s.c
	if c.cfg.AgentToken == "" {
		return nil, rpc.Error(fmt.Errorf("%w: this cluster takes no agents (no --agent-token-file)", raftfsm.ErrForbidden))
	}
	if err := rpc.RequireToken(c.cfg.AgentToken)(ctx, "", req.Header()); err != nil {
		return nil, rpc.Error(err)
	}
	m := req.Msg
	secret := randomHex(32)
	sum := sha256.Sum256([]byte(secret))
	a := &pb.Agent{
		Id: "agent-" + randomHex(8), Name: m.Name, CredentialSha256: hex.EncodeToString(sum[:]),
		Systems: sortedUnique(m.Systems), SupportedFeatures: sortedUnique(m.SupportedFeatures),
		MandatoryFeatures: sortedUnique(m.MandatoryFeatures), MaxJobs: m.MaxJobs, SpeedFactor: m.SpeedFactor,
		NixVersion: m.NixVersion,
	}
	if err := c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_REGISTER_AGENT, &pb.RegisterAgent{Agent: a}); err != nil {
		return nil, rpc.Error(err)
	}
	if live := c.live(); live != nil {
		live.touchAgent(a.Id)
	}
	c.log.Info("agent registered", "agent", a.Id, "name", a.Name, "systems", a.Systems, "features", a.SupportedFeatures)
	return connect.NewResponse(&kilnv1.RegisterResponse{AgentId: a.Id, Credential: a.Id + "." + secret}), nil
}

func (s agentService) Lease(ctx context.Context, req *connect.Request[kilnv1.LeaseRequest]) (*connect.Response[kilnv1.LeaseResponse], error) {
	c := s.c
	a, err := c.authAgent(req.Header())
	if err != nil {
		return nil, rpc.Error(err)
	}
	slots := int(min(req.Msg.FreeSlots, a.MaxJobs, 64))
	if slots == 0 {
		slots = 1
	}
	wait := time.Duration(req.Msg.WaitSeconds) * time.Second
	if wait <= 0 || wait > c.cfg.LeasePollMax {
		wait = c.cfg.LeasePollMax
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		live := c.live()
		if live == nil || !c.IsLeader() {
			return nil, rpc.Error(fmt.Errorf("%w: not the leader", raftfsm.ErrUnavailable))
		}
		fair, err := live.fairShare(c.fsm.Read(), c.fsm.AppliedIndex())
		if err != nil {
			return nil, rpc.Error(err)
		}
		live.grantMu.Lock()
		// Read under the lock: a step leaves granting only once its grant
		// is applied here, so this view has every step granting no longer
		// names as leased (an older view could pick it again and lose).
		ws := memdb.NewWatchSet()
		r := c.fsm.Read()
		ws.Add(r.Abandon())
		steps, err := r.PickRunnable(ws, a, time.Now().Unix(), slots, func(d string) bool { return live.granting[d] }, fair)
		for _, st := range steps {
			live.granting[st.DrvPath] = true
		}
		live.grantMu.Unlock()
		if err != nil {
			return nil, rpc.Error(err)
		}
		if len(steps) > 0 {
			leases, err := c.grant(ctx, a, steps)
			live.grantMu.Lock()
			for _, st := range steps {
				delete(live.granting, st.DrvPath)
			}
			live.grantMu.Unlock()
			if err != nil {
				return nil, rpc.Error(err)
			}
			if len(leases) > 0 {
				return connect.NewResponse(&kilnv1.LeaseResponse{Leases: leases}), nil
			}
			continue // every grant lost a race: look again
		}
		// Nothing fits now: wait for the runnable set to change. Steps
		// backing off become eligible by time, so wake for those too.
		wctx, wcancel := context.WithTimeout(ctx, time.Second)
		err = ws.WatchCtx(wctx)
		wcancel()
		if ctx.Err() != nil {
			return connect.NewResponse(&kilnv1.LeaseResponse{}), nil
		}
		_ = err
	}
}

// grant commits one GrantLease per step (one Raft entry, or several shared
// with other agents' grants by the proposer) and describes the leases.
func (c *Coordinator) grant(ctx context.Context, a *pb.Agent, steps []*pb.Step) ([]*kilnv1.Lease, error) {
	ttl := int64(c.cfg.LeaseTTL / time.Second)
	var cmds []*pb.Command
	for _, st := range steps {
		cmd, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_GRANT_LEASE, &pb.GrantLease{AgentId: a.Id, DrvPath: st.DrvPath, TtlSeconds: ttl}, 0)
		if err != nil {
			return nil, err
		}
		cmds = append(cmds, cmd)
	}
	res, err := c.Apply(ctx, cmds...)
	if err != nil {
		return nil, err
	}
	var out []*kilnv1.Lease
	subs := []*kilnv1.Substituter{{Url: "http://" + c.httpAddr + "/cache", TrustedPublicKeys: nonEmpty(c.cachePublicKey)}}
	live := c.live()
	for i, r := range res.Results {
		if r.Err != nil {
			continue
		}
		st := steps[i]
		if live != nil {
			live.mu.Lock()
			live.leases[r.ID] = time.Now()
			live.mu.Unlock()
		}
		attempt := st.Attempts + 1
		if rec, err := c.fsm.Read().Lease(r.ID); err == nil {
			attempt = rec.Attempt
		}
		l := &kilnv1.Lease{
			LeaseId: r.ID, DrvPath: st.DrvPath, System: st.System, RequiredFeatures: st.RequiredFeatures,
			Substituters: subs, Attempt: attempt, TtlSeconds: ttl,
			BuildTimeoutSeconds: int64(c.cfg.BuildTimeout / time.Second), MaxSilentSeconds: int64(c.cfg.MaxSilent / time.Second),
			MaxLogBytes: uint64(c.cfg.MaxLogBytes), MaxNarBytes: uint64(c.cfg.MaxNarSize),
			Outputs: rpc.OutputsToAPI(st.Outputs),
		}
		c.metrics.leasesGranted.Inc()
		c.metrics.submitToLease.Observe(max(0, float64(time.Now().Unix()-st.CreatedAt)))
		c.log.Info("lease granted", "lease", r.ID, "step", st.DrvPath, "agent", a.Id, "attempt", l.Attempt)
		out = append(out, l)
	}
	return out, nil
}

func nonEmpty(s string) []string {
	if s == "" {
		return nil
	}
	return []string{s}
}

// ownLease checks that a lease is current and held by the agent.
func (c *Coordinator) ownLease(a *pb.Agent, id uint64) (*pb.Lease, error) {
	l, err := c.fsm.Read().Lease(id)
	if errors.Is(err, raftfsm.ErrNotFound) {
		return nil, fmt.Errorf("%w: lease %d is not current", raftfsm.ErrStaleLease, id)
	}
	if err != nil {
		return nil, err
	}
	if l.AgentId != a.Id {
		return nil, fmt.Errorf("%w: lease %d belongs to another agent", raftfsm.ErrForbidden, id)
	}
	return l, nil
}

func (s agentService) Heartbeat(ctx context.Context, req *connect.Request[kilnv1.HeartbeatRequest]) (*connect.Response[kilnv1.HeartbeatResponse], error) {
	c := s.c
	a, err := c.authAgent(req.Header())
	if err != nil {
		return nil, rpc.Error(err)
	}
	live := c.live()
	if live == nil || !c.IsLeader() {
		return nil, rpc.Error(fmt.Errorf("%w: not the leader", raftfsm.ErrUnavailable))
	}
	resp := &kilnv1.HeartbeatResponse{}
	now := time.Now()
	for _, id := range req.Msg.LeaseIds {
		if _, err := c.ownLease(a, id); err != nil {
			resp.CancelLeaseIds = append(resp.CancelLeaseIds, id)
			continue
		}
		live.mu.Lock()
		live.leases[id] = now
		live.mu.Unlock()
	}
	return connect.NewResponse(resp), nil
}

func (s agentService) StreamLog(ctx context.Context, stream *connect.ClientStream[kilnv1.LogChunk]) (*connect.Response[kilnv1.StreamLogResponse], error) {
	c := s.c
	a, err := c.authAgent(stream.RequestHeader())
	if err != nil {
		return nil, rpc.Error(err)
	}
	live := c.live()
	if live == nil || !c.IsLeader() {
		return nil, rpc.Error(fmt.Errorf("%w: not the leader", raftfsm.ErrUnavailable))
	}
	var next uint64
	for stream.Receive() {
		ch := stream.Msg()
		if _, err := c.ownLease(a, ch.LeaseId); err != nil {
			return nil, rpc.Error(err)
		}
		live.mu.Lock()
		ll := live.logs[ch.LeaseId]
		if ll == nil {
			ll = &leaseLog{}
			live.logs[ch.LeaseId] = ll
		}
		if ch.Seq == ll.nextSeq && ch.Replace {
			ll.buf.Reset()
			ll.truncated = false
		}
		if ch.Seq == ll.nextSeq {
			room := c.cfg.MaxLogBytes - int64(ll.buf.Len())
			data := ch.Data
			if int64(len(data)) > room {
				data, ll.truncated = data[:max(room, 0)], true
			}
			ll.buf.Write(data)
			ll.nextSeq++
			ll.done = ll.done || ch.Last
		}
		next = ll.nextSeq
		live.mu.Unlock()
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&kilnv1.StreamLogResponse{NextSeq: next}), nil
}

func (s agentService) UploadNar(ctx context.Context, stream *connect.ClientStream[kilnv1.UploadNarRequest]) (*connect.Response[kilnv1.UploadNarResponse], error) {
	c := s.c
	a, err := c.authAgent(stream.RequestHeader())
	if err != nil {
		return nil, rpc.Error(err)
	}
	if !stream.Receive() {
		return nil, rpc.Error(fmt.Errorf("%w: empty upload", raftfsm.ErrInvalid))
	}
	hdr := stream.Msg().GetHeader()
	if hdr == nil {
		return nil, rpc.Error(fmt.Errorf("%w: an upload starts with its header", raftfsm.ErrInvalid))
	}
	if _, err := c.ownLease(a, hdr.LeaseId); err != nil {
		return nil, rpc.Error(err)
	}
	fd, blob, placed, err := c.receiveNar(ctx, hdr, &narChunks{stream: stream})
	if err != nil {
		return nil, rpc.Error(err)
	}
	refs := sortedUnique(hdr.References)
	rec := &pb.NarInfo{
		StorePath: hdr.StorePath, Url: raftfsm.NarURL(fd), Compression: "zstd",
		FileHash: "sha256:" + nixbase32.EncodeToString(fd), FileSize: hdr.FileSize,
		NarHash: hdr.NarHash, NarSize: hdr.NarSize, References: refs, Deriver: hdr.Deriver, Blob: blob,
	}
	if placed != nil {
		err = c.cacheHandler.IngestPlacedNarInfo(ctx, rec, hdr.LeaseId, *placed)
	} else {
		err = c.cacheHandler.IngestNarInfo(ctx, rec, hdr.LeaseId)
	}
	if err != nil {
		return nil, rpc.Error(err)
	}
	c.log.Info("output uploaded", "lease", hdr.LeaseId, "path", hdr.StorePath, "agent", a.Id, "bytes", hdr.FileSize)
	return connect.NewResponse(&kilnv1.UploadNarResponse{Url: rec.Url}), nil
}

// receiveNar stores an upload's bytes as a blob. A streamed upload (a
// header without hashes and sizes) is stored under its own hash and must
// end with a trailer that agrees with what arrived; hdr gets the
// trailer's values. A streamed upload is also checked and copied to a
// quorum while it arrives (uploadFanout): placed is then what the check
// found. An upload with its hashes in the header is checked and copied
// afterwards (placed is nil).
func (c *Coordinator) receiveNar(ctx context.Context, hdr *kilnv1.NarHeader, chunks *narChunks) (fd []byte, blob string, placed *cache.NarSummary, err error) {
	if streamed := hdr.FileHash == "" && hdr.FileSize == 0 && hdr.NarHash == "" && hdr.NarSize == 0; !streamed {
		if fd, err = raftfsm.ValidNixHash("file_hash", hdr.FileHash); err != nil {
			return nil, "", nil, err
		}
		if int64(hdr.FileSize) > c.cfg.MaxNarSize || int64(hdr.NarSize) > c.cfg.MaxNarSize {
			return nil, "", nil, fmt.Errorf("%w: NAR over %d bytes", raftfsm.ErrTooLarge, c.cfg.MaxNarSize)
		}
		blob = hex.EncodeToString(fd)
		return fd, blob, nil, c.blobs.Put(ctx, blob, chunks, int64(hdr.FileSize))
	}
	chunks.wantTrailer = true
	fan := c.startFanout(hdr.LeaseId)
	chunks.tee = func(b []byte) error { return fan.send(ctx, b) }
	blob, size, err := c.blobs.PutHashed(ctx, chunks, c.cfg.MaxNarSize)
	if err == nil {
		fd, err = streamedTrailer(hdr, chunks.trailer, blob, size)
	}
	if err != nil {
		fan.finish(err) // the peers drop their partial copies
		<-fan.checked   // the check ends with its stream
		return nil, "", nil, err
	}
	fan.complete(blob, size)
	sum, err := fan.wait(ctx)
	if err != nil {
		return nil, "", nil, err
	}
	return fd, blob, &sum, nil
}

// streamedTrailer checks a streamed upload's trailer against the blob its
// bytes made, copies its sizes and NarHash into hdr, and returns the
// blob's hash (the record's FileHash). The trailer's FileHash is optional
// (agents leave it out: the NAR is checked against NarHash); FileSize is
// not.
func streamedTrailer(hdr *kilnv1.NarHeader, tr *kilnv1.NarTrailer, blob string, size int64) ([]byte, error) {
	if tr == nil {
		return nil, fmt.Errorf("%w: the upload ended without its trailer", raftfsm.ErrInvalid)
	}
	fd, err := hex.DecodeString(blob)
	if err != nil {
		return nil, err
	}
	if tr.FileHash != "" {
		claimed, err := raftfsm.ValidNixHash("file_hash", tr.FileHash)
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(claimed, fd) {
			return nil, fmt.Errorf("%w: the trailer's FileHash does not match the %d bytes sent", raftfsm.ErrInvalid, size)
		}
	}
	if tr.FileSize != uint64(size) {
		return nil, fmt.Errorf("%w: the trailer's FileSize %d does not match the %d bytes sent", raftfsm.ErrInvalid, tr.FileSize, size)
	}
	hdr.FileSize, hdr.NarHash, hdr.NarSize = tr.FileSize, tr.NarHash, tr.NarSize
	return fd, nil
}

// narChunks reads an upload's zstd chunks as one byte stream, receiving
// them as the reader asks (in the handler's goroutine, never after it).
// With wantTrailer, the upload must end with a trailer, kept in trailer;
// otherwise it must end after its last chunk.
type narChunks struct {
	stream      *connect.ClientStream[kilnv1.UploadNarRequest]
	wantTrailer bool
	trailer     *kilnv1.NarTrailer
	buf         []byte
	err         error
	// tee, when set, gets each chunk as it arrives.
	tee func([]byte) error
}

func (r *narChunks) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		r.err = r.next()
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// next receives one part: a chunk goes to buf; the end is io.EOF.
func (r *narChunks) next() error {
	if !r.stream.Receive() {
		if err := r.stream.Err(); err != nil {
			return err
		}
		if r.wantTrailer {
			return fmt.Errorf("%w: the upload ended without its trailer", raftfsm.ErrInvalid)
		}
		return io.EOF
	}
	switch part := r.stream.Msg().Part.(type) {
	case *kilnv1.UploadNarRequest_ZstdChunk:
		if len(part.ZstdChunk) > rpc.MaxNarChunk {
			return fmt.Errorf("%w: chunk over 1 MiB", raftfsm.ErrTooLarge)
		}
		r.buf = part.ZstdChunk
		if r.tee != nil {
			return r.tee(part.ZstdChunk)
		}
		return nil
	case *kilnv1.UploadNarRequest_Trailer:
		if !r.wantTrailer || part.Trailer == nil {
			return fmt.Errorf("%w: a trailer in an upload whose header has its hashes", raftfsm.ErrInvalid)
		}
		if r.stream.Receive() {
			return fmt.Errorf("%w: parts after the trailer", raftfsm.ErrInvalid)
		}
		if err := r.stream.Err(); err != nil {
			return err
		}
		r.trailer = part.Trailer
		return io.EOF
	}
	return fmt.Errorf("%w: an upload's parts after its header are chunks (and a trailer)", raftfsm.ErrInvalid)
}

func (s agentService) Complete(ctx context.Context, req *connect.Request[kilnv1.CompleteRequest]) (*connect.Response[kilnv1.CompleteResponse], error) {
	c := s.c
	a, err := c.authAgent(req.Header())
	if err != nil {
		return nil, rpc.Error(err)
	}
	m := req.Msg
	l, err := c.ownLease(a, m.LeaseId)
	if err != nil {
		return nil, rpc.Error(err)
	}
	outcome := map[kilnv1.Outcome]pb.LeaseOutcome{
		kilnv1.Outcome_OUTCOME_SUCCEEDED: pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED,
		kilnv1.Outcome_OUTCOME_FAILED:    pb.LeaseOutcome_LEASE_OUTCOME_FAILED,
		kilnv1.Outcome_OUTCOME_TRANSIENT: pb.LeaseOutcome_LEASE_OUTCOME_TRANSIENT,
		kilnv1.Outcome_OUTCOME_TIMED_OUT: pb.LeaseOutcome_LEASE_OUTCOME_TIMED_OUT,
		kilnv1.Outcome_OUTCOME_RELEASED:  pb.LeaseOutcome_LEASE_OUTCOME_RELEASED,
	}[m.Outcome]
	if outcome == pb.LeaseOutcome_LEASE_OUTCOME_UNSPECIFIED {
		return nil, rpc.Error(fmt.Errorf("%w: outcome %v", raftfsm.ErrInvalid, m.Outcome))
	}
	r := c.fsm.Read()
	step, err := r.Step(l.DrvPath)
	if err != nil {
		return nil, rpc.Error(err)
	}
	if outcome == pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED {
		// A step succeeds only when every output is in the cache.
		for _, o := range step.Outputs {
			if _, err := r.NarInfo(raftfsm.HashPart(o.Path)); err != nil {
				return nil, rpc.Error(fmt.Errorf("%w: output %s has not been uploaded", raftfsm.ErrStaleLease, o.Path))
			}
		}
	}
	// The finished log is stored before the step completes.
	if live := c.live(); live != nil {
		live.mu.Lock()
		ll := live.logs[m.LeaseId]
		var logBytes []byte
		incomplete := true
		if ll != nil {
			logBytes = bytes.Clone(ll.buf.Bytes())
			incomplete = ll.truncated || !ll.done
		}
		live.mu.Unlock()
		if ll != nil {
			rec := &pb.LogRecord{DrvPath: l.DrvPath, Attempt: l.Attempt, Incomplete: incomplete}
			if err := c.cacheHandler.IngestLog(ctx, rec, bytes.NewReader(logBytes)); err != nil {
				return nil, rpc.Error(fmt.Errorf("storing the log: %w", err))
			}
		}
	}
	if err := c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_COMPLETE_LEASE, &pb.CompleteLease{
		LeaseId: m.LeaseId, Outcome: outcome, Error: m.Error, MaxTries: c.cfg.MaxTries, BackoffSeconds: int64(c.cfg.RetryBackoff / time.Second),
	}); err != nil {
		return nil, rpc.Error(err)
	}
	if live := c.live(); live != nil {
		live.mu.Lock()
		delete(live.leases, m.LeaseId)
		delete(live.logs, m.LeaseId)
		live.mu.Unlock()
	}
	c.metrics.stepDuration.Observe(max(0, float64(time.Now().Unix()-l.GrantedAt)))
	c.log.Info("lease completed", "lease", m.LeaseId, "step", l.DrvPath, "agent", a.Id, "outcome", outcome.String())
	return connect.NewResponse(&kilnv1.CompleteResponse{}), nil
}

// runLeaseExpiryLoop (leader only) expires leases whose agent stopped
// heartbeating for the lease TTL. A lease counts from its grant, its
// last heartbeat, or the first time this leader sees it, whichever is
// latest: a new leader gives every lease a fresh TTL.
func (c *Coordinator) runLeaseExpiryLoop(ctx context.Context, live *liveness) {
	for {
		// While the pool reports agents gone, look often: their leases
		// go as soon as they have also been silent for agentDeadQuiet.
		live.mu.Lock()
		tick := jitter(c.cfg.LeaseTTL / 10)
		for id, at := range live.gossipGone {
			if time.Since(at) > c.cfg.LeaseTTL {
				delete(live.gossipGone, id) // the TTL has taken over
			}
		}
		if len(live.gossipGone) > 0 {
			tick = 250 * time.Millisecond
		}
		live.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-time.After(tick):
		case <-live.expiryWake:
		}
		if !c.IsLeader() {
			continue
		}
		leases, err := c.fsm.Read().Leases()
		if err != nil {
			c.log.Error("listing leases", "err", err)
			continue
		}
		now := time.Now()
		var cmds []*pb.Command
		var ids []uint64
		var reasons []string
		byID := map[uint64]*pb.Lease{}
		live.mu.Lock()
		for _, l := range leases {
			byID[l.Id] = l
			hb, known := live.leases[l.Id]
			if !known {
				// Granted since the last look, and its grant has not yet
				// recorded when (grant does once its Apply returns): it
				// starts now. Counting from the leadership start instead
				// expired fresh leases the moment they were granted.
				live.leases[l.Id] = now
				continue
			}
			reason := fmt.Sprintf("agent %s sent no heartbeat for %v", l.AgentId, c.cfg.LeaseTTL)
			if now.Sub(hb) <= c.cfg.LeaseTTL {
				// A dead agent by gossip that is also silent loses its
				// leases now, not after the TTL.
				seen := live.since
				if t := live.agents[l.AgentId]; t.After(seen) {
					seen = t
				}
				if _, gone := live.gossipGone[l.AgentId]; !gone || now.Sub(seen) < agentDeadQuiet {
					continue
				}
				reason = fmt.Sprintf("agent %s declared dead by gossip", l.AgentId)
			}
			cmd, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_EXPIRE_LEASE, &pb.ExpireLease{
				LeaseId: l.Id, Reason: reason,
				MaxTries: c.cfg.MaxTries, BackoffSeconds: int64(c.cfg.RetryBackoff / time.Second),
			}, 0)
			if err == nil {
				cmds = append(cmds, cmd)
				ids = append(ids, l.Id)
				reasons = append(reasons, reason)
			}
		}
		// Drop the starts of leases that are gone (completed or expired
		// between the listing and now); a lease granted meanwhile and
		// dropped here starts again on the next look.
		for id := range live.leases {
			if _, ok := byID[id]; !ok {
				delete(live.leases, id)
			}
		}
		live.mu.Unlock()
		if len(cmds) == 0 {
			continue
		}
		res, err := c.Apply(ctx, cmds...)
		if err != nil {
			c.log.Warn("expiring leases", "err", err)
			continue
		}
		for i, r := range res.Results {
			live.mu.Lock()
			ll := live.logs[ids[i]]
			delete(live.leases, ids[i])
			delete(live.logs, ids[i])
			live.mu.Unlock()
			if r.Err != nil {
				continue
			}
			l := byID[ids[i]]
			c.metrics.leasesExpired.Inc()
			c.log.Warn("lease expired", "lease", ids[i], "step", l.DrvPath, "agent", l.AgentId, "reason", reasons[i])
			if ll != nil && ll.buf.Len() > 0 {
				// The attempt's log so far is kept, marked incomplete.
				rec := &pb.LogRecord{DrvPath: l.DrvPath, Attempt: l.Attempt, Incomplete: true}
				if err := c.cacheHandler.IngestLog(ctx, rec, bytes.NewReader(ll.buf.Bytes())); err != nil {
					c.log.Warn("storing the log of an expired lease", "lease", ids[i], "step", l.DrvPath, "err", err)
				}
			}
		}
	}
}

// leaderProxy sends AgentService calls that reach a follower to the
// leader, streams included, so agents may use any coordinator.
func (c *Coordinator) leaderProxy(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c.IsLeader() || r.Header.Get("Kiln-Forwarded") != "" {
			next.ServeHTTP(w, r)
			return
		}
		addr, err := c.leaderHTTPAddr()
		if err != nil {
			proxyError(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		target := &url.URL{Scheme: "http", Host: addr}
		p := &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				pr.SetURL(target)
				pr.Out.Header.Set("Kiln-Forwarded", c.id)
			},
			Transport:     c.blobClient.Transport,
			FlushInterval: -1,
			ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
				if r.Context().Err() == nil {
					c.log.Warn("forwarding an agent call to the leader failed", "leader", addr, "err", err)
				}
				proxyError(w, http.StatusBadGateway, "the leader could not be reached: "+err.Error())
			},
		}
		p.ServeHTTP(w, r)
	})
}

// proxyError answers an error both Connect clients ("code", "message")
// and REST clients ("error") understand.
func proxyError(w http.ResponseWriter, status int, msg string) {
	web.WriteJSON(w, status, map[string]string{"code": "unavailable", "message": msg, "error": msg})
}

// leaderHTTPAddr is the leader's HTTP address from the replicated nodes.
func (c *Coordinator) leaderHTTPAddr() (string, error) {
	_, id := c.raft.LeaderWithID()
	if id == "" {
		return "", fmt.Errorf("%w: no leader", raftfsm.ErrNoLeader)
	}
	n, err := c.fsm.Read().Node(string(id))
	if err != nil || n.HttpAddr == "" {
		return "", fmt.Errorf("%w: leader %s has no known HTTP address", raftfsm.ErrUnavailable, id)
	}
	return n.HttpAddr, nil
}

// handleLiveLog serves the live log of a running lease from the leader's
// memory (followers proxy the call): the bytes from ?offset=, with
// X-Kiln-Log-Size (all bytes so far) and X-Kiln-Log-Done.
func (c *Coordinator) handleLiveLog(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseUint(r.PathValue("lease"), 10, 64)
	if err != nil {
		web.WriteError(w, fmt.Errorf("%w: lease id %q", raftfsm.ErrInvalid, r.PathValue("lease")))
		return
	}
	var off int64
	if v := r.URL.Query().Get("offset"); v != "" {
		if off, err = strconv.ParseInt(v, 10, 64); err != nil || off < 0 {
			web.WriteError(w, fmt.Errorf("%w: offset %q", raftfsm.ErrInvalid, v))
			return
		}
	}
	live := c.live()
	if live == nil {
		web.WriteError(w, fmt.Errorf("%w: not the leader", raftfsm.ErrUnavailable))
		return
	}
	live.mu.Lock()
	ll := live.logs[id]
	var chunk []byte
	var size int64
	done := false
	if ll != nil {
		b := ll.buf.Bytes()
		size = int64(len(b))
		if off < size {
			chunk = bytes.Clone(b[off:min(size, off+4<<20)])
		}
		done = ll.done
	}
	live.mu.Unlock()
	if ll == nil {
		web.WriteError(w, fmt.Errorf("%w: no live log for lease %d (finished logs are under /cache/log/)", raftfsm.ErrNotFound, id))
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Kiln-Log-Size", strconv.FormatInt(size, 10))
	w.Header().Set("X-Kiln-Log-Done", strconv.FormatBool(done))
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(chunk)
}
