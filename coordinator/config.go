package coordinator

import (
	"fmt"

	"github.com/kilnci/kiln/cache"
	"log/slog"
	"time"
)

// DefaultGroupCommitWait is Config.GroupCommitWait's default.
const DefaultGroupCommitWait = 300 * time.Microsecond

// Config configures one coordinator.
type Config struct {
	// NodeID names this node in the Raft configuration. Empty: the ID kept
	// in DataDir, or a new random one written there.
	NodeID  string
	DataDir string
	// HTTPAddr and RaftAddr are listen addresses ("127.0.0.1:0" picks a port).
	HTTPAddr string
	RaftAddr string
	// AdvertiseHTTP and AdvertiseRaft are how peers reach this node; empty
	// means the bound address (a wildcard host becomes 127.0.0.1).
	AdvertiseHTTP string
	AdvertiseRaft string
	// Bootstrap makes this node a one-voter cluster if it has no state yet.
	Bootstrap bool
	// Join lists HTTP URLs of existing members; the leader adds this node.
	Join []string
	// AdminToken authorises writes (and coordinator-to-coordinator calls).
	AdminToken string
	// MaxBodyBytes bounds request bodies (default 8 MiB).
	MaxBodyBytes int64
	// MaxReadWait bounds how long a read asking for a fresher index
	// (X-Kiln-Min-Index) waits for this node to apply it (5 s).
	MaxReadWait time.Duration

	// Raft tuning; zero values keep hashicorp/raft's defaults.
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	SnapshotThreshold  uint64
	SnapshotInterval   time.Duration
	// TrailingLogs is how many entries stay in the log after a snapshot.
	TrailingLogs uint64
	// ApplyTimeout bounds how long a write waits to be committed (default 10s).
	ApplyTimeout time.Duration
	// GroupCommitWait is how long the leader's next Raft entry waits for
	// the writers the last one answered, when it was shared (default
	// 300µs; negative: never waits). See proposer.
	GroupCommitWait time.Duration

	// CacheKeyFile is the binary cache's secret signing key (kiln keygen);
	// without one the cache serves but accepts no uploads.
	CacheKeyFile string
	// MaxNarSize bounds an uploaded NAR, compressed and not (default 8 GiB).
	MaxNarSize int64
	// BlobPushTimeout bounds copying a blob to a peer, plus 1 s per MiB
	// (default 30 s).
	BlobPushTimeout time.Duration
	// BlobSyncInterval is the longest the missing-blob fetcher waits
	// between scans when no record changes (default 1 minute).
	BlobSyncInterval time.Duration
	// CacheScrubInterval is how often blobs are re-hashed (0: never;
	// the coordinator command defaults to 24 h).
	CacheScrubInterval time.Duration
	// BlobOrphanGrace is how old a blob no record names must be before it
	// is deleted (default 1 h).
	BlobOrphanGrace time.Duration
	// CacheGCInterval is how often the leader collects cache garbage (0:
	// never); CacheGCGrace protects records younger than it.
	CacheGCInterval time.Duration
	CacheGCGrace    time.Duration

	// AgentToken is the join token agents register with ("" refuses agents).
	AgentToken string
	// LeaseTTL: a lease without a heartbeat for this long expires (30 s).
	LeaseTTL time.Duration
	// LeasePollMax caps how long a Lease long-poll is held (30 s).
	LeasePollMax time.Duration
	// BuildTimeout and MaxSilent are the limits leases carry (0: none).
	BuildTimeout time.Duration
	MaxSilent    time.Duration
	// MaxLogBytes bounds a step's stored log (64 MiB).
	MaxLogBytes int64
	// StreamIdleTimeout ends an agent call whose request body stalls this
	// long (an upload or log stream that stopped sending; 2 min).
	StreamIdleTimeout time.Duration
	// MaxTries and RetryBackoff govern transient failures (5, 10 s).
	MaxTries     uint32
	RetryBackoff time.Duration

	// GossipAddr, when set, joins this coordinator to the memberlist pool
	// it shares with agents (bind address; port 0 picks one);
	// AdvertiseGossip is how others reach it. GossipKeyFile holds the AES
	// keyring (base64 keys, one per line, the first primary), re-read when
	// it changes.
	GossipAddr      string
	AdvertiseGossip string
	GossipKeyFile   string
	// RetryJoin lists gossip addresses of other coordinators to join.
	RetryJoin []string
	// BootstrapExpect: with no Raft state, wait for this many coordinators
	// in the pool, then bootstrap Raft with all of them (as Consul does).
	BootstrapExpect int
	// DeadServerCleanup: the leader removes a voter the pool has declared
	// dead for this long, if MinQuorum voters remain (default 30 s, 3).
	DeadServerCleanup time.Duration
	MinQuorum         int
	// LeaveOnTerminate makes Close leave the pool (the leader then removes
	// this node from Raft at once); by default a stopped coordinator is
	// merely failed, as a restart would be.
	LeaveOnTerminate bool
	// GossipProbeInterval tunes failure detection (memberlist LAN default 1 s).
	GossipProbeInterval time.Duration

	Logger *slog.Logger
}

func (c *Config) setDefaults() error {
	if c.DeadServerCleanup <= 0 {
		c.DeadServerCleanup = 30 * time.Second
	}
	if c.MinQuorum <= 0 {
		c.MinQuorum = 3
	}
	if c.DataDir == "" {
		return fmt.Errorf("coordinator: a data directory is required")
	}
	if c.HTTPAddr == "" {
		c.HTTPAddr = ":8080"
	}
	if c.RaftAddr == "" {
		c.RaftAddr = "127.0.0.1:8300"
	}
	if c.AdminToken == "" {
		return fmt.Errorf("coordinator: an admin token is required")
	}
	if c.StreamIdleTimeout <= 0 {
		c.StreamIdleTimeout = 2 * time.Minute
	}
	if c.MaxReadWait <= 0 {
		c.MaxReadWait = 5 * time.Second
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 8 << 20
	}
	if c.ApplyTimeout <= 0 {
		c.ApplyTimeout = 10 * time.Second
	}
	if c.GroupCommitWait == 0 {
		c.GroupCommitWait = DefaultGroupCommitWait
	}
	if c.MaxNarSize <= 0 {
		c.MaxNarSize = cache.DefaultMaxNarSize
	}
	if c.BlobPushTimeout <= 0 {
		c.BlobPushTimeout = 30 * time.Second
	}
	if c.BlobSyncInterval <= 0 {
		c.BlobSyncInterval = time.Minute
	}
	if c.BlobOrphanGrace <= 0 {
		c.BlobOrphanGrace = time.Hour
	}
	if c.CacheGCInterval > 0 && c.CacheGCGrace <= 0 {
		c.CacheGCGrace = 24 * time.Hour
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 30 * time.Second
	}
	if c.LeasePollMax <= 0 {
		c.LeasePollMax = 30 * time.Second
	}
	if c.MaxLogBytes <= 0 {
		c.MaxLogBytes = cache.DefaultMaxLogSize
	}
	if c.MaxTries == 0 {
		c.MaxTries = 5
	}
	if c.RetryBackoff <= 0 {
		c.RetryBackoff = 10 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Bootstrap && len(c.Join) > 0 {
		return fmt.Errorf("coordinator: --bootstrap and --join exclude each other")
	}
	return nil
}
