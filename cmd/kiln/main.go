// Command kiln is the Kiln build farm: coordinators, agents, and the tools around them.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnci/kiln/agent"
	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/coordinator"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "kiln:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "kiln",
		Short:         "Kiln: a distributed, Raft-replicated Nix build farm",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return applyConfig(cmd, os.LookupEnv)
		},
	}
	root.AddCommand(newCoordinatorCmd(), newDevCmd(), newKeygenCmd(), newAgentCmd(), newBuildCmd())
	root.AddCommand(newClusterCmd())
	return root
}

// coordinatorFlags are the flags shared by `coordinator` and `dev`.
type coordinatorFlags struct {
	cfg            coordinator.Config
	adminTokenFile string
	agentTokenFile string
	logLevel       string
	raftHeartbeat  time.Duration
	raftElection   time.Duration
	memoryLimit    string
}

func (f *coordinatorFlags) register(cmd *cobra.Command, httpDefault, raftDefault string) {
	fl := cmd.Flags()
	fl.String("config", "", "TOML configuration file (also KILN_CONFIG)")
	fl.StringVar(&f.cfg.DataDir, "data-dir", "", "directory for Raft state, snapshots and blobs")
	fl.StringVar(&f.cfg.HTTPAddr, "http-addr", httpDefault, "HTTP listen address (API, cache, Connect, metrics)")
	fl.StringVar(&f.cfg.RaftAddr, "raft-addr", raftDefault, "Raft listen address")
	fl.StringVar(&f.cfg.AdvertiseHTTP, "advertise-http", "", "HTTP address peers use to reach this node (default: the bound address)")
	fl.StringVar(&f.cfg.AdvertiseRaft, "advertise-raft", "", "Raft address peers use to reach this node (default: the bound address)")
	fl.StringVar(&f.cfg.NodeID, "node-id", "", "Raft server ID (default: kept in the data dir, random on first start)")
	fl.StringVar(&f.adminTokenFile, "admin-token-file", "", "file holding the bootstrap admin token")
	fl.Int64Var(&f.cfg.MaxBodyBytes, "max-body-bytes", 8<<20, "largest request body accepted")
	fl.DurationVar(&f.cfg.MaxReadWait, "max-read-wait", 5*time.Second, "longest a read asking for a fresher index (X-Kiln-Min-Index) waits")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fl.StringVar(&f.memoryLimit, "memory-limit", "auto", "soft memory limit for the Go runtime: a size (900MiB, 2GiB), none, or auto (90% of the cgroup's limit, if any, unless GOMEMLIMIT is set)")
	fl.DurationVar(&f.raftHeartbeat, "raft-heartbeat-timeout", 0, "Raft heartbeat timeout (0: raft's default)")
	fl.DurationVar(&f.raftElection, "raft-election-timeout", 0, "Raft election timeout (0: raft's default)")
	fl.DurationVar(&f.cfg.GroupCommitWait, "group-commit-wait", coordinator.DefaultGroupCommitWait, "after a Raft entry shared by several writes, how long the next waits for those writers to write again (0: never waits)")
	fl.StringVar(&f.cfg.CacheKeyFile, "cache-key-file", "", "the binary cache's secret signing key (kiln keygen); must not be readable by group or others")
	fl.Int64Var(&f.cfg.MaxNarSize, "max-nar-size", 8<<30, "largest NAR accepted, compressed or not")
	fl.DurationVar(&f.cfg.CacheScrubInterval, "cache-scrub-interval", 24*time.Hour, "how often every blob is re-hashed and repaired from peers (0: never)")
	fl.DurationVar(&f.cfg.CacheGCInterval, "cache-gc-interval", 0, "how often the leader deletes cache paths no root reaches (0: never)")
	fl.DurationVar(&f.cfg.CacheGCGrace, "cache-gc-grace", 24*time.Hour, "cache paths younger than this are never collected")
	fl.DurationVar(&f.cfg.BlobOrphanGrace, "blob-orphan-grace", time.Hour, "blobs no record names are deleted once older than this")
	fl.DurationVar(&f.cfg.BlobSyncInterval, "blob-sync-interval", time.Minute, "longest wait between scans for blobs this node lacks")
	fl.StringVar(&f.agentTokenFile, "agent-token-file", "", "file holding the join token agents register with (none: no agents)")
	fl.DurationVar(&f.cfg.LeaseTTL, "lease-ttl", 30*time.Second, "a lease whose agent sends no heartbeat for this long expires")
	fl.DurationVar(&f.cfg.BuildTimeout, "build-timeout", 0, "longest a build may run (0: no limit)")
	fl.DurationVar(&f.cfg.MaxSilent, "max-silent-time", 0, "longest a build may print nothing (0: no limit)")
	fl.Int64Var(&f.cfg.MaxLogBytes, "max-log-bytes", 64<<20, "largest build log stored")
	fl.DurationVar(&f.cfg.StreamIdleTimeout, "stream-idle-timeout", 2*time.Minute, "an agent upload or log stream that sends nothing for this long is ended")
	fl.Uint32Var(&f.cfg.MaxTries, "max-tries", 5, "attempts of a step failing for transient reasons before it is aborted")
	fl.DurationVar(&f.cfg.RetryBackoff, "retry-backoff", 10*time.Second, "wait before a step that failed transiently runs again")
	fl.StringVar(&f.cfg.GossipAddr, "gossip-addr", "", "join the gossip pool shared with agents on this address (port 7946 when omitted; empty: no gossip)")
	fl.StringVar(&f.cfg.AdvertiseGossip, "advertise-gossip", "", "gossip address others use to reach this node (default: the bound address)")
	fl.StringVar(&f.cfg.GossipKeyFile, "gossip-key-file", "", "AES keyring for gossip: base64 keys, one per line, the first primary (re-read on change)")
	fl.StringSliceVar(&f.cfg.RetryJoin, "retry-join", nil, "gossip address(es) of other coordinators to join, retried until one answers")
	fl.IntVar(&f.cfg.BootstrapExpect, "bootstrap-expect", 0, "with no state yet, bootstrap Raft once this many coordinators are in the pool")
	fl.DurationVar(&f.cfg.DeadServerCleanup, "dead-server-cleanup", 30*time.Second, "remove a voter the pool declared dead this long ago (if --min-quorum voters remain)")
	fl.IntVar(&f.cfg.MinQuorum, "min-quorum", 3, "dead servers are removed automatically only while at least this many voters remain")
	fl.BoolVar(&f.cfg.LeaveOnTerminate, "leave-on-terminate", false, "on shutdown leave the pool, so the leader removes this node from Raft at once")
	fl.DurationVar(&f.cfg.GossipProbeInterval, "gossip-probe-interval", 0, "gossip failure-detection probe interval (0: memberlist's LAN default, 1s)")
}

// withGossipPort adds the default gossip port to addresses without one.
func withGossipPort(addrs ...string) []string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		if a != "" && !strings.Contains(a, ":") {
			a += ":7946"
		}
		out = append(out, a)
	}
	return out
}

func (f *coordinatorFlags) logger() (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(f.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", f.logLevel, err)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})), nil
}

func (f *coordinatorFlags) finish() error {
	log, err := f.logger()
	if err != nil {
		return err
	}
	f.cfg.Logger = log
	if err := applyMemoryLimit(f.memoryLimit, log); err != nil {
		return err
	}
	if f.agentTokenFile != "" {
		tok, err := readToken(f.agentTokenFile)
		if err != nil {
			return fmt.Errorf("agent token: %w", err)
		}
		f.cfg.AgentToken = tok
	}
	if f.cfg.GossipAddr != "" {
		f.cfg.GossipAddr = withGossipPort(f.cfg.GossipAddr)[0]
	}
	f.cfg.RetryJoin = withGossipPort(f.cfg.RetryJoin...)
	if f.cfg.BootstrapExpect > 0 && f.cfg.GossipAddr == "" {
		return errors.New("--bootstrap-expect needs --gossip-addr")
	}
	f.cfg.HeartbeatTimeout = f.raftHeartbeat
	f.cfg.ElectionTimeout = f.raftElection
	switch {
	case f.cfg.GroupCommitWait < 0:
		return errors.New("--group-commit-wait must not be negative")
	case f.cfg.GroupCommitWait == 0:
		f.cfg.GroupCommitWait = -1 // the flag's 0 means none; the config's, the default
	}
	if f.raftHeartbeat > 0 && f.raftHeartbeat < 1000*time.Millisecond {
		f.cfg.LeaderLeaseTimeout = f.raftHeartbeat / 2
	}
	return nil
}

func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 {
		return "", fmt.Errorf("admin token in %s is shorter than 16 characters", path)
	}
	return tok, nil
}

func newCoordinatorCmd() *cobra.Command {
	var f coordinatorFlags
	cmd := &cobra.Command{
		Use:   "coordinator",
		Short: "Run one member of the coordinator cluster",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.finish(); err != nil {
				return err
			}
			if f.cfg.DataDir == "" {
				return errors.New("--data-dir is required")
			}
			if f.adminTokenFile == "" {
				return errors.New("--admin-token-file is required")
			}
			tok, err := readToken(f.adminTokenFile)
			if err != nil {
				return err
			}
			f.cfg.AdminToken = tok
			return runCoordinator(cmd.Context(), f.cfg, nil)
		},
	}
	f.register(cmd, ":8080", "127.0.0.1:8300")
	cmd.Flags().BoolVar(&f.cfg.Bootstrap, "bootstrap", false, "start a new cluster with this node as its first voter")
	cmd.Flags().StringSliceVar(&f.cfg.Join, "join", nil, "HTTP URL(s) of existing members to join")
	return cmd
}

// runCoordinator runs until SIGINT/SIGTERM, then shuts down gracefully.
func runCoordinator(ctx context.Context, cfg coordinator.Config, started func(context.Context, *coordinator.Coordinator) func()) error {
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := coordinator.New(cfg)
	if err != nil {
		return err
	}
	if err := c.Start(); err != nil {
		return err
	}
	var wait func()
	if started != nil {
		wait = started(ctx, c)
	}
	<-ctx.Done()
	cfg.Logger.Info("shutting down")
	if wait != nil {
		wait()
	}
	return c.Close()
}

func newDevCmd() *cobra.Command {
	var f coordinatorFlags
	var agentStore string
	var agentJobs int
	var agentNixOptions []string
	var noAgent bool
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a single-node Kiln for local use (data in a temp dir unless --data-dir)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.finish(); err != nil {
				return err
			}
			if f.cfg.DataDir == "" {
				dir, err := os.MkdirTemp("", "kiln-dev-")
				if err != nil {
					return err
				}
				f.cfg.DataDir = dir
			}
			if err := os.MkdirAll(f.cfg.DataDir, 0o700); err != nil {
				return err
			}
			if f.adminTokenFile == "" {
				f.adminTokenFile = filepath.Join(f.cfg.DataDir, "admin-token")
				if err := ensureToken(f.adminTokenFile); err != nil {
					return err
				}
			}
			tok, err := readToken(f.adminTokenFile)
			if err != nil {
				return err
			}
			f.cfg.AdminToken = tok
			f.cfg.Bootstrap = true
			if f.cfg.CacheKeyFile == "" {
				f.cfg.CacheKeyFile = filepath.Join(f.cfg.DataDir, "cache-key.sec")
				if _, err := os.Stat(f.cfg.CacheKeyFile); errors.Is(err, os.ErrNotExist) {
					if _, err := cache.WriteKeyFiles("kiln-dev-1", f.cfg.CacheKeyFile, filepath.Join(f.cfg.DataDir, "cache-key.pub")); err != nil {
						return err
					}
				}
			}
			agentTokenFile := f.agentTokenFile
			if agentTokenFile == "" {
				agentTokenFile = filepath.Join(f.cfg.DataDir, "agent-token")
				if err := ensureToken(agentTokenFile); err != nil {
					return err
				}
			}
			if f.cfg.AgentToken, err = readToken(agentTokenFile); err != nil {
				return err
			}
			return runCoordinator(cmd.Context(), f.cfg, func(ctx context.Context, c *coordinator.Coordinator) func() {
				wait := func() {}
				if !noAgent {
					// The agent registers once the single node leads (or
					// after 30 s, retrying on its own from then on).
					deadline := time.Now().Add(30 * time.Second)
					for ok, _ := c.Ready(); !ok && ctx.Err() == nil && time.Now().Before(deadline); ok, _ = c.Ready() {
						select {
						case <-ctx.Done():
						case <-time.After(20 * time.Millisecond):
						}
					}
					wait = startDevAgent(ctx, f.cfg, c.HTTPAddr(), agentStore, agentJobs, agentNixOptions)
				}
				fmt.Printf("Kiln dev is running.\n  API:         http://%s/api/v1/builds\n  Cluster:     http://%s/api/v1/cluster\n  Data dir:    %s\n  Admin token: %s\n  (token file: %s)\n",
					c.HTTPAddr(), c.HTTPAddr(), f.cfg.DataDir, tok, f.adminTokenFile)
				fmt.Printf("  Substituter: http://%s/cache\n  Public key:  %s\n  Push:        nix copy --to 'http://%s/cache?compression=zstd' PATH  (netrc password: the admin token)\n",
					c.HTTPAddr(), c.CachePublicKey(), c.HTTPAddr())
				fmt.Printf("  Build:       kiln build -f examples/default.nix --coordinator http://%s --token-file %s\n", c.HTTPAddr(), f.adminTokenFile)
				return wait
			})
		},
	}
	f.register(cmd, "127.0.0.1:8080", "127.0.0.1:8300")
	cmd.Flags().BoolVar(&noAgent, "no-agent", false, "do not run the local agent")
	cmd.Flags().StringVar(&agentStore, "agent-store", "", "Nix store the local agent builds in (default: the host's store)")
	cmd.Flags().IntVar(&agentJobs, "agent-max-jobs", 2, "builds the local agent runs at once")
	cmd.Flags().StringArrayVar(&agentNixOptions, "agent-nix-option", nil, "extra Nix option NAME=VALUE for the local agent's builds")
	return cmd
}

// startDevAgent runs an agent on the local Nix next to the dev
// coordinator; it returns a function that waits for it to stop.
func startDevAgent(ctx context.Context, cfg coordinator.Config, httpAddr, store string, jobs int, nixOptions []string) func() {
	log := cfg.Logger.With("component", "agent")
	systems, features, err := localNix()
	if err != nil {
		log.Warn("no local Nix: running without an agent", "err", err)
		fmt.Println("  Agent:       none (no local Nix found)")
		return func() {}
	}
	a, err := agent.New(agent.Config{
		Coordinators: []string{"http://" + httpAddr}, JoinToken: cfg.AgentToken,
		WorkDir: filepath.Join(cfg.DataDir, "agent"), Store: store, Systems: systems, Features: features,
		MaxJobs: jobs, Name: "kiln-dev", NixOptions: nixOptions, Logger: log,
	})
	if err != nil {
		log.Error("local agent", "err", err)
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.Run(ctx); err != nil && ctx.Err() == nil {
			log.Error("local agent stopped", "err", err)
		}
	}()
	where := store
	if where == "" {
		where = "the host's store"
	}
	fmt.Printf("  Agent:       local, systems %v, features %v, building in %s\n", systems, features, where)
	return func() { <-done }
}

// ensureToken writes a new random token to path unless one is there.
func ensureToken(path string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(hex.EncodeToString(b)+"\n"), 0o600)
}
