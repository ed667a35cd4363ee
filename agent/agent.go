package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"github.com/kilnci/kiln/gossip"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// Config configures an agent.
type Config struct {
	// Coordinators are HTTP base URLs of any coordinators (followers
	// forward agent calls to the leader).
	Coordinators []string
	// JoinToken is the cluster's agent join token, used once to register.
	JoinToken string
	// WorkDir keeps the agent's credential and the cache of the Nix it runs.
	WorkDir string
	// Store is a Nix store URI or chroot root passed as --store ("": the
	// default store).
	Store string
	// Systems, Features and MandatoryFeatures describe what it builds.
	Systems           []string
	Features          []string
	MandatoryFeatures []string
	MaxJobs           int
	Name              string
	// NixOptions are extra "name=value" options for every Nix call.
	NixOptions []string
	// HeartbeatInterval (default 3 s) must be well under the lease TTL.
	HeartbeatInterval time.Duration
	// DrainTimeout bounds a drain (Drain): builds still running then are
	// stopped and handed back (default 10 min).
	DrainTimeout time.Duration
	// GossipAddr, when set, joins the coordinators' gossip pool from this
	// bind address; GossipJoin names gossip addresses to join (default:
	// those the coordinators report). GossipKeyFile is the AES keyring.
	GossipAddr          string
	AdvertiseGossip     string
	GossipKeyFile       string
	GossipJoin          []string
	GossipProbeInterval time.Duration
	Logger              *slog.Logger
}

// Agent is one running builder.
type Agent struct {
	cfg  Config
	log  *slog.Logger
	hc   *http.Client
	cred string
	// coordinators: the configured ones plus those discovered since.
	coordinators atomic.Pointer[[]coordinatorClient]
	id           string

	mu      sync.Mutex
	running map[uint64]context.CancelCauseFunc
	slots   chan struct{}

	drain     chan struct{} // closed by Drain
	drainOnce sync.Once

	pool        *gossip.Pool
	gossipPeers atomic.Pointer[[]string]
}

// errHandBack stops a build that a drain gives back to the queue.
var errHandBack = errors.New("handed back: the agent is draining")

// Drain asks a running agent to stop taking leases, finish what it holds
// (handing back what is still running after DrainTimeout) and return from
// Run. Safe to call more than once.
func (a *Agent) Drain() { a.drainOnce.Do(func() { close(a.drain) }) }

// New prepares an agent; Run registers and works until ctx ends.
func New(cfg Config) (*Agent, error) {
	if len(cfg.Coordinators) == 0 {
		return nil, errors.New("agent: at least one coordinator URL is required")
	}
	if cfg.WorkDir == "" {
		return nil, errors.New("agent: a work directory is required")
	}
	if cfg.MaxJobs <= 0 {
		cfg.MaxJobs = 1
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = 3 * time.Second
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 10 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	if err := os.MkdirAll(cfg.WorkDir, 0o700); err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, running: map[uint64]context.CancelCauseFunc{}, slots: make(chan struct{}, cfg.MaxJobs),
		drain: make(chan struct{})}
	a.hc = rpc.NewHTTPClient(16)
	a.setCoordinators(cfg.Coordinators)
	a.gossipPeers.Store(&[]string{})
	return a, nil
}

type coordinatorClient struct {
	url    string
	client kilnv1connect.AgentServiceClient
}

// setCoordinators replaces the coordinators the agent calls (keeping the
// clients of those it already had).
func (a *Agent) setCoordinators(urls []string) {
	old := map[string]kilnv1connect.AgentServiceClient{}
	if p := a.coordinators.Load(); p != nil {
		for _, c := range *p {
			old[c.url] = c.client
		}
	}
	var out []coordinatorClient
	for _, u := range urls {
		u = strings.TrimRight(u, "/")
		if slices.ContainsFunc(out, func(c coordinatorClient) bool { return c.url == u }) {
			continue
		}
		cl := old[u]
		if cl == nil {
			cl = kilnv1connect.NewAgentServiceClient(a.hc, u, connect.WithSendMaxBytes(2<<20), connect.WithReadMaxBytes(8<<20))
		}
		out = append(out, coordinatorClient{url: u, client: cl})
	}
	a.coordinators.Store(&out)
}

// Coordinators lists the coordinator URLs the agent currently uses.
func (a *Agent) Coordinators() []string {
	var out []string
	for _, c := range *a.coordinators.Load() {
		out = append(out, c.url)
	}
	return out
}

// discover asks any known coordinator for the cluster's members and adds
// their HTTP addresses to those the agent calls (configured ones stay:
// they are how it finds the cluster again).
func (a *Agent) discover(ctx context.Context) error {
	var last error
	for _, c := range *a.coordinators.Load() {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		members, err := a.members(rctx, c.url)
		cancel()
		if err != nil {
			last = err
			continue
		}
		urls := slices.Clone(a.cfg.Coordinators)
		var peers []string
		for _, m := range members {
			urls = append(urls, "http://"+m.HTTPAddr)
			if m.GossipAddr != "" {
				peers = append(peers, m.GossipAddr)
			}
		}
		for _, h := range a.poolCoordinators() {
			urls = append(urls, "http://"+h)
		}
		a.gossipPeers.Store(&peers)
		before := a.Coordinators()
		a.setCoordinators(urls)
		if after := a.Coordinators(); !slices.Equal(before, after) {
			a.log.Info("coordinators discovered", "agent", a.id, "coordinators", after)
		}
		return nil
	}
	return last
}

type memberAddrs struct {
	HTTPAddr   string `json:"http_addr"`
	GossipAddr string `json:"gossip_addr"`
}

// members reads the members' addresses from a coordinator's /api/v1/cluster.
func (a *Agent) members(ctx context.Context, base string) ([]memberAddrs, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/api/v1/cluster", nil)
	if err != nil {
		return nil, err
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s/api/v1/cluster: %s", base, resp.Status)
	}
	var body struct {
		Members []memberAddrs `json:"members"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&body); err != nil {
		return nil, err
	}
	var out []memberAddrs
	for _, m := range body.Members {
		if m.HTTPAddr != "" {
			out = append(out, m)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s/api/v1/cluster names no member", base)
	}
	return out, nil
}

// runDiscoveryLoop refreshes the coordinators: soon after start, then
// about every minute.
func (a *Agent) runDiscoveryLoop(ctx context.Context) {
	for i := 0; ; i++ {
		if err := a.discover(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("discovering coordinators failed", "agent", a.id, "err", err)
		}
		d := 45*time.Second + time.Duration(rand.Int64N(int64(30*time.Second)))
		if i < 3 {
			d = time.Second // until the cluster has settled (gossip addresses appear)
		}
		if sleep(ctx, d) != nil {
			return
		}
	}
}

// ID is the agent's ID once registered.
func (a *Agent) ID() string { return a.id }

// call runs fn against the coordinators in turn until one answers with
// something other than "unavailable".
func call[T any](ctx context.Context, a *Agent, fn func(kilnv1connect.AgentServiceClient) (T, error)) (T, error) {
	var zero T
	var last error
	clients := *a.coordinators.Load()
	start := rand.IntN(len(clients))
	for i := range clients {
		res, err := fn(clients[(start+i)%len(clients)].client)
		if err == nil {
			return res, nil
		}
		last = err
		if c := connect.CodeOf(err); c != connect.CodeUnavailable && c != connect.CodeUnknown && c != connect.CodeInternal && c != connect.CodeDeadlineExceeded {
			return zero, err
		}
		if ctx.Err() != nil {
			return zero, ctx.Err()
		}
	}
	return zero, last
}

func withBearer[T any](m *T, tok string) *connect.Request[T] {
	r := connect.NewRequest(m)
	r.Header().Set("Authorization", "Bearer "+tok)
	return r
}

// register loads the credential kept in the work dir, or registers.
func (a *Agent) register(ctx context.Context) error {
	credFile := filepath.Join(a.cfg.WorkDir, "credential")
	if b, err := os.ReadFile(credFile); err == nil {
		a.cred = strings.TrimSpace(string(b))
		a.id, _, _ = strings.Cut(a.cred, ".")
		// Check it still works (the cluster may have been rebuilt).
		_, err := call(ctx, a, func(c kilnv1connect.AgentServiceClient) (*connect.Response[kilnv1.HeartbeatResponse], error) {
			return c.Heartbeat(ctx, withBearer(&kilnv1.HeartbeatRequest{}, a.cred))
		})
		if err == nil {
			a.log.Info("agent resumed", "agent", a.id)
			return nil
		}
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			return err
		}
		a.log.Warn("stored credential refused: registering again", "agent", a.id)
	}
	resp, err := call(ctx, a, func(c kilnv1connect.AgentServiceClient) (*connect.Response[kilnv1.RegisterResponse], error) {
		return c.Register(ctx, withBearer(&kilnv1.RegisterRequest{
			Name: a.cfg.Name, Systems: a.cfg.Systems, SupportedFeatures: a.cfg.Features,
			MandatoryFeatures: a.cfg.MandatoryFeatures, MaxJobs: uint32(a.cfg.MaxJobs), NixVersion: nixVersion(),
		}, a.cfg.JoinToken))
	})
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	a.cred, a.id = resp.Msg.Credential, resp.Msg.AgentId
	if err := os.WriteFile(credFile, []byte(a.cred+"\n"), 0o600); err != nil {
		return err
	}
	a.log.Info("agent registered", "agent", a.id, "systems", a.cfg.Systems, "features", a.cfg.Features)
	return nil
}

// Run registers (with backoff) and then leases and builds until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		err := a.register(ctx)
		if err == nil {
			break
		}
		if c := connect.CodeOf(err); c == connect.CodePermissionDenied || c == connect.CodeUnauthenticated || c == connect.CodeInvalidArgument {
			return err
		}
		a.log.Warn("registration failed, retrying", "err", err)
		if sleep(ctx, backoff(attempt)) != nil {
			return ctx.Err()
		}
	}
	if err := a.startGossip(); err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	drained := false
	// Three lifetimes: leasing stops first on a drain; builds run until
	// they finish (or the drain times out, or ctx ends); heartbeats last
	// as long as any build.
	leaseCtx, stopLeasing := context.WithCancel(ctx)
	buildCtx, stopBuilds := context.WithCancel(ctx)
	hbCtx, stopHeartbeats := context.WithCancel(context.WithoutCancel(ctx))
	var builds sync.WaitGroup
	var loops sync.WaitGroup
	loops.Go(func() { a.runHeartbeatLoop(hbCtx) })
	loops.Go(func() { a.runDiscoveryLoop(hbCtx) })
	loops.Go(func() { a.runGossipLoop(hbCtx) })
	leasing := make(chan struct{})
	go func() { defer close(leasing); a.runLeaseLoop(leaseCtx, buildCtx, &builds) }()
	select {
	case <-ctx.Done():
	case <-a.drain:
		drained = true
		a.log.Info("draining: no new leases; finishing the running builds", "agent", a.id, "running", a.runningCount(), "timeout", a.cfg.DrainTimeout)
		stopLeasing()
		<-leasing
		done := make(chan struct{})
		go func() { builds.Wait(); close(done) }()
		timer := time.NewTimer(a.cfg.DrainTimeout)
		select {
		case <-done:
		case <-timer.C:
			a.log.Warn("drain timed out: handing back the running builds", "agent", a.id, "running", a.runningCount())
			a.mu.Lock()
			for _, stop := range a.running {
				stop(errHandBack)
			}
			a.mu.Unlock()
			<-done
		case <-ctx.Done():
		}
		timer.Stop()
	}
	stopLeasing()
	<-leasing
	stopBuilds()
	builds.Wait()
	stopHeartbeats()
	loops.Wait()
	a.stopGossip(drained)
	a.log.Info("agent stopped", "agent", a.id)
	return nil
}

func (a *Agent) runningCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.running)
}

func backoff(attempt int) time.Duration {
	d := 100 * time.Millisecond << min(attempt, 6)
	return d/2 + time.Duration(rand.Int64N(int64(d)))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// runLeaseLoop long-polls for work whenever a slot is free, until ctx ends;
// builds run under buildCtx, counted in wg.
func (a *Agent) runLeaseLoop(ctx, buildCtx context.Context, wg *sync.WaitGroup) {
	failures := 0
	for ctx.Err() == nil {
		// Wait for a free slot.
		select {
		case a.slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		free := a.cfg.MaxJobs - len(a.slots) + 1
		pctx, cancel := context.WithTimeout(ctx, 45*time.Second)
		resp, err := call(pctx, a, func(c kilnv1connect.AgentServiceClient) (*connect.Response[kilnv1.LeaseResponse], error) {
			return c.Lease(pctx, withBearer(&kilnv1.LeaseRequest{FreeSlots: uint32(free), WaitSeconds: 30}, a.cred))
		})
		cancel()
		if err != nil {
			<-a.slots
			if ctx.Err() != nil {
				return
			}
			failures++
			a.log.Warn("lease poll failed", "err", err)
			_ = sleep(ctx, backoff(failures))
			continue
		}
		failures = 0
		leases := resp.Msg.Leases
		if len(leases) == 0 {
			<-a.slots
			continue
		}
		for i, l := range leases {
			if i > 0 {
				a.slots <- struct{}{} // the first took the slot we hold
			}
			bctx, bcancel := context.WithCancelCause(buildCtx)
			a.mu.Lock()
			a.running[l.LeaseId] = bcancel
			a.mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-a.slots }()
				defer func() {
					a.mu.Lock()
					delete(a.running, l.LeaseId)
					a.mu.Unlock()
					bcancel(nil)
				}()
				a.runBuild(bctx, l)
			}()
		}
	}
}

// runHeartbeatLoop reports running leases and stops those the leader
// says are cancelled or no longer current.
func (a *Agent) runHeartbeatLoop(ctx context.Context) {
	for {
		d := a.cfg.HeartbeatInterval
		if sleep(ctx, d-d/4+time.Duration(rand.Int64N(int64(d)/2+1))) != nil {
			return
		}
		a.mu.Lock()
		ids := make([]uint64, 0, len(a.running))
		for id := range a.running {
			ids = append(ids, id)
		}
		a.mu.Unlock()
		slices.Sort(ids)
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := call(hctx, a, func(c kilnv1connect.AgentServiceClient) (*connect.Response[kilnv1.HeartbeatResponse], error) {
			return c.Heartbeat(hctx, withBearer(&kilnv1.HeartbeatRequest{LeaseIds: ids}, a.cred))
		})
		cancel()
		if err != nil {
			a.log.Warn("heartbeat failed", "err", err)
			continue
		}
		for _, id := range resp.Msg.CancelLeaseIds {
			a.mu.Lock()
			stop := a.running[id]
			a.mu.Unlock()
			if stop != nil {
				a.log.Warn("lease cancelled by the coordinator: stopping its build", "lease", id)
				stop(errors.New("lease cancelled by the coordinator"))
			}
		}
	}
}
