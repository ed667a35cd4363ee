package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/gossip"
	"github.com/kilnci/kiln/raftfsm"
	"github.com/kilnci/kiln/rpc"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// Coordinator is one member of the coordinator cluster.
type Coordinator struct {
	cfg      Config
	log      *slog.Logger
	id       string
	raftAddr string // advertised
	httpAddr string // advertised

	fsm   *notifyingFSM
	parts *raftParts
	raft  *raft.Raft
	prop  *proposer

	nextBuildID atomic.Uint64
	leaderReady atomic.Bool
	// readyIndex is the commit index learned once a leader was first seen;
	// /ready waits until this node has applied it.
	readyIndex atomic.Uint64

	leaderMu      sync.Mutex
	leaderChanged chan struct{}

	peersMu    sync.Mutex
	peers      map[string]kilnv1connect.ClusterServiceClient
	httpClient *http.Client

	// The binary cache: local blobs, the cache handler, background copies.
	blobs          *localBlobs
	cacheHandler   *cache.Handler
	cachePublicKey string
	blobClient     *http.Client
	bgMu           sync.Mutex
	bgCtx          context.Context
	bg             sync.WaitGroup
	scrubMu        sync.Mutex
	lastScrub      atomic.Pointer[ScrubReport]

	// liveness is the leader's heartbeat memory (nil when not leading).
	liveness atomic.Pointer[liveness]

	metrics *metrics

	// pool is the gossip pool (nil without --gossip-addr).
	pool *gossip.Pool

	httpLn net.Listener
	srv    *http.Server

	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed sync.Once
}

// New prepares a coordinator; Start runs it.
func New(cfg Config) (*Coordinator, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, err
	}
	id, err := nodeID(&cfg)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger.With("node", id)
	c := &Coordinator{
		cfg: cfg, log: log, id: id,
		fsm:           newNotifyingFSM(raftfsm.New(log)),
		leaderChanged: make(chan struct{}),
		peers:         map[string]kilnv1connect.ClusterServiceClient{},
		httpClient:    newHTTPClient(),
		blobClient:    rpc.NewHTTPClient(8),
	}
	c.metrics = newMetrics(c)
	return c, nil
}

// ID is this node's Raft server ID.
func (c *Coordinator) ID() string { return c.id }

// HTTPAddr is the advertised HTTP address (host:port).
func (c *Coordinator) HTTPAddr() string { return c.httpAddr }

// RaftAddr is the advertised Raft address.
func (c *Coordinator) RaftAddr() string { return c.raftAddr }

// FSM gives read access to the replicated state.
func (c *Coordinator) FSM() *raftfsm.FSM { return c.fsm.FSM }

// Raft exposes the Raft node (tests, benchmarks, admin verbs).
func (c *Coordinator) Raft() *raft.Raft { return c.raft }

// IsLeader reports whether this node leads and accepts writes.
func (c *Coordinator) IsLeader() bool {
	return c.raft.State() == raft.Leader && c.leaderReady.Load()
}

// Start opens the listeners and starts Raft and the background loops.
func (c *Coordinator) Start() error {
	ln, err := net.Listen("tcp", c.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("listen on HTTP address: %w", err)
	}
	c.httpLn = ln
	if c.httpAddr, err = advertised(c.cfg.AdvertiseHTTP, ln.Addr()); err != nil {
		ln.Close()
		return err
	}
	parts, err := c.startRaft()
	if err != nil {
		ln.Close()
		return err
	}
	c.parts, c.raft = parts, parts.raft
	c.prop = newProposer(c.raft, c.cfg.ApplyTimeout, max(c.cfg.GroupCommitWait, 0))
	c.prop.observe = c.metrics.commitDuration.Observe

	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	c.bgMu.Lock()
	c.bgCtx = ctx
	c.bgMu.Unlock()
	if err := c.openCache(ctx); err != nil {
		cancel()
		ln.Close()
		_ = c.raft.Shutdown().Error()
		_ = c.parts.trans.Close()
		_ = c.parts.store.Close()
		return err
	}
	if err := c.startGossip(ctx); err != nil {
		cancel()
		ln.Close()
		_ = c.raft.Shutdown().Error()
		_ = c.parts.trans.Close()
		_ = c.parts.store.Close()
		return fmt.Errorf("gossip: %w", err)
	}
	c.srv = c.newHTTPServer()
	// Narinfo GETs are answered off the connection; everything else is
	// handed to net/http (cache.FastListener).
	fast := c.cacheHandler.NewFastListener(ln, cache.FastOptions{IdleTimeout: c.srv.IdleTimeout, HeaderTimeout: c.srv.ReadHeaderTimeout})
	c.goLoop(func() {
		if err := c.srv.Serve(fast); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.log.Error("http server stopped", "err", err)
		}
	})
	c.goLoop(func() { c.prop.run(ctx) })
	c.goLoop(func() { c.runLeadershipLoop(ctx) })
	c.goLoop(func() { c.runObserveLoop(ctx) })
	if len(c.cfg.Join) > 0 {
		c.goLoop(func() { c.runJoinLoop(ctx) })
	}
	c.goLoop(func() { c.runBlobSyncLoop(ctx) })
	c.goLoop(func() { c.runBlobSweepLoop(ctx) })
	if c.cfg.CacheScrubInterval > 0 {
		c.goLoop(func() { c.runScrubLoop(ctx) })
	}
	c.log.Info("coordinator started", "http", c.httpAddr, "raft", c.raftAddr, "bootstrap", c.cfg.Bootstrap)
	return nil
}

func (c *Coordinator) goLoop(fn func()) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		fn()
	}()
}

// Close stops serving, shuts Raft down and waits for every loop to end.
func (c *Coordinator) Close() error {
	var err error
	c.closed.Do(func() {
		c.handOffLeadership()
		c.stopGossip()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if c.srv != nil {
			_ = c.srv.Shutdown(ctx)
			_ = c.srv.Close()
		}
		if c.cancel != nil {
			c.bgMu.Lock()
			c.cancel()
			c.bgMu.Unlock()
		}
		c.bg.Wait()
		if c.raft != nil {
			err = c.raft.Shutdown().Error()
		}
		c.wg.Wait()
		if c.parts != nil {
			_ = c.parts.trans.Close()
			if cerr := c.parts.store.Close(); err == nil {
				err = cerr
			}
		}
	})
	return err
}

// runObserveLoop turns Raft's leader observations into leaderChanged signals.
func (c *Coordinator) runObserveLoop(ctx context.Context) {
	ch := make(chan raft.Observation, 16)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	c.raft.RegisterObserver(obs)
	defer c.raft.DeregisterObserver(obs)
	for {
		select {
		case <-ch:
			c.noteLeaderContact()
			c.signalLeaderChange()
		case <-ctx.Done():
			return
		}
	}
}

// noteLeaderContact records, the first time a leader is known, the commit
// index to reach before /ready answers 200. It is called from the observer
// and from Ready itself, because the first contact can come before the
// observer is registered.
func (c *Coordinator) noteLeaderContact() {
	if c.readyIndex.Load() != 0 {
		return
	}
	if _, id := c.raft.LeaderWithID(); id != "" {
		c.readyIndex.CompareAndSwap(0, max(c.raft.CommitIndex(), 1))
	}
}

// runLeadershipLoop starts the leader-only work when this node wins an
// election and stops it when leadership is lost.
func (c *Coordinator) runLeadershipLoop(ctx context.Context) {
	var stop context.CancelFunc
	var done chan struct{}
	stopLeading := func() {
		if stop != nil {
			stop()
			<-done
			stop = nil
		}
		c.leaderReady.Store(false)
		c.signalLeaderChange()
	}
	defer stopLeading()
	for {
		select {
		case leader := <-c.parts.notify:
			switch {
			case leader && stop == nil:
				lctx, cancel := context.WithCancel(ctx)
				stop, done = cancel, make(chan struct{})
				go func() {
					defer close(done)
					c.leaderLoop(lctx)
				}()
			case !leader:
				c.log.Info("lost leadership")
				stopLeading()
			}
		case <-ctx.Done():
			return
		}
	}
}

// leaderLoop runs while this node leads. After a barrier (so the state
// holds every committed entry) it takes up the leader's duties.
func (c *Coordinator) leaderLoop(ctx context.Context) {
	for attempt := 0; ; attempt++ {
		// Not the future alone: raft never answers a barrier still
		// queued when it shuts down, and Close waits for this loop.
		err := futureError(ctx, c.raft.Barrier(c.cfg.ApplyTimeout))
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			break
		}
		c.log.Warn("barrier failed", "err", err)
		select {
		case <-time.After(retryBackoff(attempt)):
		case <-ctx.Done():
			return
		}
	}
	maxID, err := c.fsm.Read().MaxBuildID()
	if err != nil {
		c.log.Error("reading build ids", "err", err)
		return
	}
	c.nextBuildID.Store(maxID)
	live := newLiveness()
	c.liveness.Store(live)
	defer c.liveness.CompareAndSwap(live, nil)
	c.leaderReady.Store(true)
	c.signalLeaderChange()
	c.log.Info("leading", "applied_index", c.fsm.AppliedIndex())
	c.registerSelf(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.runLeaseExpiryLoop(ctx, live)
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.runMembershipLoop(ctx, live)
	}()
	if c.cfg.CacheGCInterval > 0 {
		c.runCacheGCLoop(ctx)
	}
	<-ctx.Done()
}

// runJoinLoop asks the configured members to add this node until one does.
func (c *Coordinator) runJoinLoop(ctx context.Context) {
	for attempt := 0; ; attempt++ {
		for _, u := range c.cfg.Join {
			if err := c.joinVia(ctx, u); err != nil {
				c.log.Warn("join attempt failed", "via", u, "err", err)
				continue
			}
			c.log.Info("joined the cluster", "via", u)
			return
		}
		select {
		case <-time.After(retryBackoff(attempt + 4)):
		case <-ctx.Done():
			return
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
