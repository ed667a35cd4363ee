package coordinator

import (
	"fmt"
	"log/slog"
	"time"
)

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

	Logger *slog.Logger
}

func (c *Config) setDefaults() error {
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
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 8 << 20
	}
	if c.ApplyTimeout <= 0 {
		c.ApplyTimeout = 10 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Bootstrap && len(c.Join) > 0 {
		return fmt.Errorf("coordinator: --bootstrap and --join exclude each other")
	}
	return nil
}
