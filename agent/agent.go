package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

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
	// WorkDir keeps the agent's credential and temporary files.
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
	Logger            *slog.Logger
}

// Agent is one running builder.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	clients []kilnv1connect.AgentServiceClient
	cred    string
	id      string

	mu      sync.Mutex
	running map[uint64]context.CancelFunc
	slots   chan struct{}
}

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
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	if err := os.MkdirAll(cfg.WorkDir, 0o700); err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, running: map[uint64]context.CancelFunc{}, slots: make(chan struct{}, cfg.MaxJobs)}
	// No client timeout: long-polls and uploads carry their own deadlines.
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16, IdleConnTimeout: time.Minute}}
	for _, u := range cfg.Coordinators {
		a.clients = append(a.clients, kilnv1connect.NewAgentServiceClient(hc, strings.TrimRight(u, "/"),
			connect.WithSendMaxBytes(2<<20), connect.WithReadMaxBytes(8<<20)))
	}
	return a, nil
}

// ID is the agent's ID once registered.
func (a *Agent) ID() string { return a.id }

// call runs fn against the coordinators in turn until one answers with
// something other than "unavailable".
func call[T any](ctx context.Context, a *Agent, fn func(kilnv1connect.AgentServiceClient) (T, error)) (T, error) {
	var zero T
	var last error
	start := rand.IntN(len(a.clients))
	for i := range a.clients {
		res, err := fn(a.clients[(start+i)%len(a.clients)])
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
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); a.runHeartbeatLoop(ctx) }()
	go func() { defer wg.Done(); a.runLeaseLoop(ctx, &wg) }()
	wg.Wait()
	return nil
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

// runLeaseLoop long-polls for work whenever a slot is free.
func (a *Agent) runLeaseLoop(ctx context.Context, wg *sync.WaitGroup) {
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
			bctx, bcancel := context.WithCancel(ctx)
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
					bcancel()
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
				stop()
			}
		}
	}
}
