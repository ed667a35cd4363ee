package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnci/kiln/agent"
)

func newAgentCmd() *cobra.Command {
	var cfg agent.Config
	var tokenFile, logLevel string
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run a build agent: lease work from the coordinators and build it with the local Nix",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: %w", logLevel, err)
			}
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
			if len(cfg.Coordinators) == 0 {
				return errors.New("--coordinator is required")
			}
			if tokenFile == "" {
				return errors.New("--token-file is required")
			}
			tok, err := readToken(tokenFile)
			if err != nil {
				return err
			}
			cfg.JoinToken = tok
			if len(cfg.Systems) == 0 || !cmd.Flags().Changed("features") {
				systems, features, err := localNix()
				if err != nil {
					return fmt.Errorf("asking the local Nix for its systems and features (or pass --systems and --features): %w", err)
				}
				if len(cfg.Systems) == 0 {
					cfg.Systems = systems
				}
				if !cmd.Flags().Changed("features") {
					cfg.Features = features
				}
			}
			for i, u := range cfg.Coordinators {
				if !strings.Contains(u, "://") {
					cfg.Coordinators[i] = "http://" + u
				}
			}
			if cfg.GossipAddr != "" {
				cfg.GossipAddr = withGossipPort(cfg.GossipAddr)[0]
			}
			cfg.GossipJoin = withGossipPort(cfg.GossipJoin...)
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			// The first SIGTERM or SIGINT drains (no new leases, running
			// builds finish or, past --drain-timeout, are handed back);
			// a second one stops at once.
			ctx, stop := context.WithCancel(cmd.Context())
			defer stop()
			sigs := make(chan os.Signal, 2)
			signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
			defer signal.Stop(sigs)
			go func() {
				select {
				case <-sigs:
					cfg.Logger.Info("signal received: draining (send it again to stop at once)")
					a.Drain()
				case <-ctx.Done():
					return
				}
				select {
				case <-sigs:
					stop()
				case <-ctx.Done():
				}
			}()
			return a.Run(ctx)
		},
	}
	fl := cmd.Flags()
	fl.StringSliceVar(&cfg.Coordinators, "coordinator", nil, "coordinator URL(s); any member works")
	fl.StringVar(&tokenFile, "token-file", "", "file holding the cluster's agent join token")
	fl.StringVar(&cfg.WorkDir, "work-dir", "/var/lib/kiln-agent", "keeps the agent's credential and the cache of the Nix it runs")
	fl.StringVar(&cfg.Store, "store", "", "Nix store to build in (a chroot root like /tmp/agentA, or a store URI; default: the local store)")
	fl.StringSliceVar(&cfg.Systems, "systems", nil, "systems this agent builds (default: what the local Nix reports)")
	fl.StringSliceVar(&cfg.Features, "features", nil, "supported system features (default: what the local Nix reports)")
	fl.StringSliceVar(&cfg.MandatoryFeatures, "mandatory-features", nil, "features a step must require to be built here")
	fl.IntVar(&cfg.MaxJobs, "max-jobs", 1, "builds run at once")
	fl.StringVar(&cfg.Name, "name", "", "a name for the dashboard (default: the host name)")
	fl.StringArrayVar(&cfg.NixOptions, "nix-option", nil, "extra Nix option NAME=VALUE for every build (repeatable)")
	fl.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", 0, "heartbeat period (default 3s)")
	fl.DurationVar(&cfg.DrainTimeout, "drain-timeout", 10*time.Minute, "on SIGTERM, how long running builds may finish before they are handed back")
	fl.StringVar(&cfg.GossipAddr, "gossip-addr", "", "join the coordinators' gossip pool on this bind address (port 7946 when omitted; empty: heartbeats alone)")
	fl.StringVar(&cfg.AdvertiseGossip, "advertise-gossip", "", "gossip address others use to reach this agent (default: the bound address)")
	fl.StringVar(&cfg.GossipKeyFile, "gossip-key-file", "", "the pool's AES keyring (base64 keys, one per line, the first primary)")
	fl.StringSliceVar(&cfg.GossipJoin, "gossip-join", nil, "gossip address(es) to join (default: those the coordinators report)")
	fl.DurationVar(&cfg.GossipProbeInterval, "gossip-probe-interval", 0, "gossip failure-detection probe interval (0: 1s)")
	fl.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}

// localNix reads the system, extra platforms and system features from
// `nix show-config`.
func localNix() (systems, features []string, err error) {
	out, err := exec.Command("nix", "--extra-experimental-features", "nix-command", "show-config").Output()
	if err != nil {
		return nil, nil, err
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " = ")
		if !ok {
			continue
		}
		switch k {
		case "system":
			systems = append([]string{v}, systems...)
		case "extra-platforms":
			systems = append(systems, strings.Fields(v)...)
		case "system-features":
			features = strings.Fields(v)
		}
	}
	if len(systems) == 0 {
		return nil, nil, errors.New("nix show-config names no system")
	}
	return systems, features, nil
}
