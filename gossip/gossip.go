// Package gossip runs the memberlist pool that coordinators and agents share: liveness, metadata and discovery.
//
// Every coordinator and every agent runs one Pool (a hashicorp/memberlist
// instance with LAN defaults). Each member advertises a small Meta (role,
// addresses, systems, ...) that all others see; membership changes are
// reported through Config.OnEvent and Pool.Members. Traffic is encrypted and
// authenticated with AES-GCM when Config.KeyFile is set; the key file is
// re-read periodically so keys can be rotated without restarts.
package gossip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// ErrClosed is returned by operations on a pool that has left or been shut
// down.
var ErrClosed = errors.New("gossip: pool has left or been shut down")

const (
	defaultBindAddr          = "0.0.0.0:7946"
	defaultKeyReloadInterval = 5 * time.Second
	defaultRetryJoinInterval = 2 * time.Second
	updateNodeTimeout        = 5 * time.Second
	eventQueueSize           = 1024
)

// Config configures a Pool. Name is required; everything else has defaults.
type Config struct {
	// Name identifies the member; it must be unique in the pool and stable
	// across restarts of the same process.
	Name string
	// BindAddr is the host:port to listen on, TCP and UDP. The host may be
	// an IP or a name (resolved once, IPv4 preferred); an empty host means
	// all interfaces, port 0 a kernel-chosen port, which is then also the
	// advertised one. Empty means "0.0.0.0:7946".
	BindAddr string
	// AdvertiseAddr is the host or host:port other members should use to
	// reach this one; a missing or zero port means the bound port. Empty
	// means the bind IP, or a private IP of this host when bound to all
	// interfaces (New fails when there is none).
	AdvertiseAddr string
	// KeyFile, if set, turns on encryption: base64 AES keys (16, 24 or 32
	// bytes), one per line, the first being the primary; blank lines and
	// '#' comments are ignored. The file must not be accessible by group or
	// others.
	KeyFile string
	// Meta is advertised to the other members; see Pool.SetMeta.
	Meta Meta
	// Logger receives the pool's and memberlist's logs; nil means
	// slog.Default().
	Logger *slog.Logger
	// OnEvent, if set, is called for every membership change, in order, from
	// a single goroutine owned by the pool. It must not block for long and
	// must not call Shutdown: events are queued in a bounded buffer and
	// dropped (with a warning) when it is full. Events still queued at
	// Shutdown are discarded.
	OnEvent func(Event)

	// Failure-detector and gossip tuning; zero keeps memberlist's LAN
	// defaults (1 s, 500 ms, 4, 200 ms). When only ProbeInterval is set and
	// it is not above the default ProbeTimeout, ProbeTimeout becomes half of
	// it.
	ProbeInterval  time.Duration
	ProbeTimeout   time.Duration
	SuspicionMult  int
	GossipInterval time.Duration

	// KeyReloadInterval is how often KeyFile is checked for changes; 0 means
	// 5 s, negative disables the check (ReloadKeys still works).
	KeyReloadInterval time.Duration
}

// Pool is this process's membership in the gossip pool. Its methods are safe
// for concurrent use.
type Pool struct {
	cfg       Config
	log       *slog.Logger
	ml        *memberlist.Memberlist
	keyring   *memberlist.Keyring // nil without KeyFile
	bcast     *memberlist.TransmitLimitedQueue
	localAddr string
	bindIP    net.IP
	retention time.Duration // how long dead/left members are reported

	alive  atomic.Int32 // alive members, self included; for the broadcast queue
	closed atomic.Bool
	left   atomic.Bool

	mu      sync.Mutex // guards the fields below
	meta    []byte
	members map[string]*memberEntry
	intents map[string]time.Time // leave intents by member name
	seen    map[string]time.Time // leave intents already handled
	leaving bool

	metaMu sync.Mutex // serialises SetMeta
	lifeMu sync.Mutex // serialises Leave and Shutdown

	keyMu          sync.Mutex // guards key reloads and the fields below
	keyFileContent []byte
	keyErr         string

	events chan Event
	stop   chan struct{}
	wg     sync.WaitGroup
}

// New starts a pool member: it binds, starts gossiping (alone) and, if
// Config.OnEvent is set, delivers a Join event for itself. Call Join or
// RetryJoin to meet the others, and Shutdown to stop.
func New(cfg Config) (*Pool, error) {
	if cfg.Name == "" {
		return nil, errors.New("gossip: Config.Name is required")
	}
	meta, err := cfg.Meta.Encode()
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}

	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.Name
	mc.Logger = NewStdLogger(logger)

	bindHost, bindPort, err := splitAddr(cfg.BindAddr, defaultBindAddr)
	if err != nil {
		return nil, fmt.Errorf("gossip: BindAddr: %w", err)
	}
	bindIP := net.IPv4zero
	if bindHost != "" {
		if bindIP, err = resolveIP(bindHost); err != nil {
			return nil, fmt.Errorf("gossip: BindAddr: %w", err)
		}
	}
	mc.BindAddr, mc.BindPort = bindIP.String(), bindPort
	mc.AdvertiseAddr, mc.AdvertisePort = "", bindPort
	if cfg.AdvertiseAddr != "" {
		host, port, err := splitAddr(cfg.AdvertiseAddr, "")
		if err != nil {
			return nil, fmt.Errorf("gossip: AdvertiseAddr: %w", err)
		}
		ip, err := resolveIP(host)
		if err != nil {
			return nil, fmt.Errorf("gossip: AdvertiseAddr: %w", err)
		}
		if port != 0 && bindPort == 0 {
			// memberlist overwrites AdvertisePort with the bound port when
			// BindPort is 0, so the explicit port would be silently lost.
			return nil, errors.New("gossip: AdvertiseAddr has a fixed port but BindAddr's port is 0")
		}
		if port == 0 {
			port = bindPort
		}
		mc.AdvertiseAddr, mc.AdvertisePort = ip.String(), port
	}

	if cfg.ProbeInterval > 0 {
		mc.ProbeInterval = cfg.ProbeInterval
		if cfg.ProbeTimeout <= 0 && mc.ProbeTimeout >= cfg.ProbeInterval {
			mc.ProbeTimeout = cfg.ProbeInterval / 2
		}
	}
	if cfg.ProbeTimeout > 0 {
		mc.ProbeTimeout = cfg.ProbeTimeout
	}
	if cfg.SuspicionMult > 0 {
		mc.SuspicionMult = cfg.SuspicionMult
	}
	if cfg.GossipInterval > 0 {
		mc.GossipInterval = cfg.GossipInterval
	}

	p := &Pool{
		cfg:       cfg,
		log:       logger,
		bindIP:    bindIP,
		retention: mc.GossipToTheDeadTime,
		meta:      meta,
		members:   make(map[string]*memberEntry),
		intents:   make(map[string]time.Time),
		seen:      make(map[string]time.Time),
		events:    make(chan Event, eventQueueSize),
		stop:      make(chan struct{}),
	}
	p.bcast = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return int(p.alive.Load()) },
		RetransmitMult: mc.RetransmitMult,
	}

	if cfg.KeyFile != "" {
		keys, raw, err := readKeyFile(cfg.KeyFile)
		if err != nil {
			return nil, err
		}
		if p.keyring, err = memberlist.NewKeyring(keys, keys[0]); err != nil {
			return nil, fmt.Errorf("gossip: keyring: %w", err)
		}
		p.keyFileContent = raw
		mc.Keyring = p.keyring
		mc.GossipVerifyIncoming = true
		mc.GossipVerifyOutgoing = true
	}

	d := delegate{p: p}
	mc.Delegate = d
	mc.Events = d
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("gossip: starting memberlist: %w", err)
	}
	p.ml = ml
	// Read once, before anyone knows us: memberlist may rewrite the local
	// node (under its lock) later, and its address never changes.
	p.localAddr = ml.LocalNode().Address()

	if cfg.OnEvent != nil {
		p.wg.Add(1)
		go p.dispatch()
	}
	if p.keyring != nil && cfg.KeyReloadInterval >= 0 {
		every := cfg.KeyReloadInterval
		if every == 0 {
			every = defaultKeyReloadInterval
		}
		p.wg.Add(1)
		go p.reloadKeysLoop(every)
	}
	logger.Info("gossip: pool started", "name", cfg.Name, "addr", p.localAddr, "encrypted", p.keyring != nil)
	return p, nil
}

// splitAddr parses "host:port" (or a bare host when def is "") into host
// and port; empty s means def.
func splitAddr(s, def string) (string, int, error) {
	if s == "" {
		s = def
	}
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		if def != "" {
			return "", 0, err
		}
		return s, 0, nil // bare host
	}
	if portStr == "" {
		return host, 0, nil
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return "", 0, fmt.Errorf("bad port %q", portStr)
	}
	return host, int(port), nil
}

// resolveIP returns host as an IP, resolving names (IPv4 preferred).
func resolveIP(host string) (net.IP, error) {
	if host == "" {
		return nil, errors.New("missing host")
	}
	if ip := net.ParseIP(host); ip != nil {
		return ip, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupIP(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	for _, ip := range ips {
		if ip.To4() != nil {
			return ip, nil
		}
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("%s: no addresses", host)
	}
	return ips[0], nil
}

// LocalAddr returns the gossip address (host:port) other members use to
// reach this pool: the advertised one, with the real port when BindAddr's
// port was 0.
func (p *Pool) LocalAddr() string { return p.localAddr }

// Join makes one attempt to contact addrs (host:port; a missing port means
// this pool's own port) and exchange state with them. It returns how many
// were reached, and an error only when none was. This pool's own address is
// skipped, so a list naming only this pool returns 0, nil: it is the first
// member. ctx bounds the wait; an abandoned attempt still finishes in the
// background within memberlist's TCP timeout (10 s).
func (p *Pool) Join(ctx context.Context, addrs []string) (int, error) {
	if p.closed.Load() || p.left.Load() {
		return 0, ErrClosed
	}
	if len(addrs) == 0 {
		return 0, errors.New("gossip: join: no addresses")
	}
	var targets []string
	for _, a := range addrs {
		if !p.isSelf(a) {
			targets = append(targets, a)
		}
	}
	if len(targets) == 0 {
		return 0, nil
	}
	type result struct {
		n   int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		n, err := p.ml.Join(targets)
		ch <- result{n, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return r.n, fmt.Errorf("gossip: join: %w", r.err)
		}
		return r.n, nil
	case <-ctx.Done():
		return 0, fmt.Errorf("gossip: join: %w", ctx.Err())
	case <-p.stop:
		return 0, ErrClosed
	}
}

// isSelf reports whether addr is this pool's own gossip address.
func (p *Pool) isSelf(addr string) bool {
	if addr == p.localAddr {
		return true
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	lhost, lport, _ := net.SplitHostPort(p.localAddr)
	ip := net.ParseIP(host)
	if port != lport || ip == nil {
		return false
	}
	return ip.Equal(net.ParseIP(lhost)) || ip.Equal(p.bindIP) ||
		(p.bindIP.IsUnspecified() && ip.IsLoopback())
}

// RetryJoin calls Join every interval (jittered by ±50%; 0 means 2 s)
// until it reaches at least one member, logging each failure. It returns nil
// once joined, or the context's error (with the last join error) when ctx
// ends, or ErrClosed.
func (p *Pool) RetryJoin(ctx context.Context, addrs []string, every time.Duration) error {
	if every <= 0 {
		every = defaultRetryJoinInterval
	}
	for attempt := 1; ; attempt++ {
		n, err := p.Join(ctx, addrs)
		if err == nil {
			p.log.Info("gossip: joined pool", "contacted", n, "attempts", attempt)
			return nil
		}
		if errors.Is(err, ErrClosed) {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("gossip: giving up joining %v after %d attempts: %w (last error: %v)", addrs, attempt, ctx.Err(), err)
		}
		wait := every/2 + rand.N(every)
		p.log.Warn("gossip: join failed, retrying", "addrs", addrs, "attempt", attempt, "retry_in", wait, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("gossip: giving up joining %v after %d attempts: %w (last error: %v)", addrs, attempt, ctx.Err(), err)
		case <-p.stop:
			t.Stop()
			return ErrClosed
		}
	}
}

// SetMeta replaces the advertised meta and broadcasts it, waiting up to 5 s
// for the broadcast to go out. It fails with an error wrapping
// ErrMetaTooLarge (leaving the old meta in place) when m is too large, and
// with ErrClosed after Leave or Shutdown. On a broadcast timeout the new meta
// is in place and still spreads through gossip.
func (p *Pool) SetMeta(m Meta) error {
	b, err := m.Encode()
	if err != nil {
		return err
	}
	p.metaMu.Lock()
	defer p.metaMu.Unlock()
	if p.closed.Load() || p.left.Load() {
		return ErrClosed
	}
	p.mu.Lock()
	p.meta = b
	p.mu.Unlock()
	if err := p.ml.UpdateNode(updateNodeTimeout); err != nil {
		return fmt.Errorf("gossip: broadcasting meta: %w", err)
	}
	return nil
}

// Leave gracefully leaves the pool: the others report this member as left
// rather than dead. It waits up to timeout (0 means: up to 5 s for the
// leave intent, then as long as memberlist needs) for the news to go out.
// The pool keeps running until Shutdown; it cannot rejoin. Calling Leave
// again is a no-op; after Shutdown it returns ErrClosed.
func (p *Pool) Leave(timeout time.Duration) error {
	p.lifeMu.Lock()
	defer p.lifeMu.Unlock()
	if p.closed.Load() {
		return ErrClosed
	}
	if p.left.Swap(true) {
		return nil
	}
	p.mu.Lock()
	p.leaving = true
	p.mu.Unlock()

	start := time.Now()
	if p.alive.Load() > 1 {
		in := leaveIntent{Name: p.cfg.Name, Nonce: rand.Uint64()}
		p.mu.Lock()
		p.seen[intentKey(in)] = time.Now() // don't re-gossip our own intent
		p.mu.Unlock()
		b := newIntentBroadcast(in)
		p.bcast.QueueBroadcast(b)
		wait := timeout / 2
		if timeout <= 0 {
			wait = 5 * time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-b.done:
		case <-t.C:
			p.log.Warn("gossip: leave intent not fully gossiped before timeout; some members may report this one as dead")
		}
		t.Stop()
	}
	rest := timeout
	if timeout > 0 {
		rest = max(timeout-time.Since(start), time.Millisecond)
	}
	if err := p.ml.Leave(rest); err != nil {
		return fmt.Errorf("gossip: leave: %w", err)
	}
	p.log.Info("gossip: left pool", "name", p.cfg.Name)
	return nil
}

// Shutdown stops the pool without leaving (the others will declare it dead
// unless Leave was called first) and waits for its goroutines, OnEvent's
// included. It is safe to call more than once.
func (p *Pool) Shutdown() error {
	p.lifeMu.Lock()
	defer p.lifeMu.Unlock()
	if p.closed.Swap(true) {
		return nil
	}
	err := p.ml.Shutdown()
	close(p.stop)
	p.wg.Wait()
	p.bcast.Reset()
	if err != nil {
		return fmt.Errorf("gossip: shutdown: %w", err)
	}
	return nil
}
