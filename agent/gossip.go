package agent

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/kilnci/kiln/gossip"
)

// The agent's membership in the gossip pool: coordinators learn at once
// when it dies or leaves, and it learns the coordinators. Optional: an
// agent that cannot gossip (behind NAT) works through heartbeats alone.

// startGossip joins the pool when a gossip address is configured.
func (a *Agent) startGossip() error {
	if a.cfg.GossipAddr == "" {
		return nil
	}
	meta := gossip.Meta{Role: gossip.RoleAgent, AgentID: a.id, Systems: a.cfg.Systems, Features: a.cfg.Features,
		MaxJobs: uint32(a.cfg.MaxJobs), Version: nixVersion()}
	// Metadata is at most 512 bytes: shed what does not fit, the
	// coordinators have all of it from the registration anyway.
	if _, err := meta.Encode(); errors.Is(err, gossip.ErrMetaTooLarge) {
		meta.Features = nil
		if _, err := meta.Encode(); errors.Is(err, gossip.ErrMetaTooLarge) {
			meta.Systems, meta.Version = nil, ""
		}
	}
	pool, err := gossip.New(gossip.Config{
		Name: a.id, BindAddr: a.cfg.GossipAddr, AdvertiseAddr: a.cfg.AdvertiseGossip, KeyFile: a.cfg.GossipKeyFile,
		Meta: meta, Logger: a.log, ProbeInterval: a.cfg.GossipProbeInterval,
	})
	if err != nil {
		return err
	}
	a.pool = pool
	return nil
}

// runGossipLoop joins the pool through the configured or discovered
// coordinators' gossip addresses, and joins again whenever no coordinator
// is alive in its view.
func (a *Agent) runGossipLoop(ctx context.Context) {
	if a.pool == nil {
		return
	}
	joined := false
	for attempt := 0; ; attempt++ {
		if !a.seesCoordinator() {
			addrs := slices.Concat(a.cfg.GossipJoin, *a.gossipPeers.Load())
			if len(addrs) > 0 {
				jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				n, err := a.pool.Join(jctx, addrs)
				cancel()
				switch {
				case err == nil && n > 0:
					a.log.Info("joined the gossip pool", "agent", a.id, "via", addrs)
					joined, attempt = true, 0
				case ctx.Err() == nil && (joined || attempt%10 == 3):
					a.log.Warn("joining the gossip pool failed: working through heartbeats alone", "agent", a.id, "err", err)
				}
			}
		}
		if sleep(ctx, min(backoff(attempt+3), 20*time.Second)) != nil {
			return
		}
	}
}

func (a *Agent) seesCoordinator() bool {
	for _, m := range a.pool.Members() {
		if m.Meta.Role == gossip.RoleCoordinator && m.State == gossip.StateAlive {
			return true
		}
	}
	return false
}

// poolCoordinators are the HTTP addresses of coordinators alive in the pool.
func (a *Agent) poolCoordinators() []string {
	if a.pool == nil {
		return nil
	}
	var out []string
	for _, m := range a.pool.Members() {
		if m.Meta.Role == gossip.RoleCoordinator && m.State == gossip.StateAlive && m.Meta.HTTPAddr != "" {
			out = append(out, m.Meta.HTTPAddr)
		}
	}
	return out
}

// stopGossip leaves the pool (a drained agent says goodbye, so its leases
// need no failure detection) and shuts it down.
func (a *Agent) stopGossip(leave bool) {
	if a.pool == nil {
		return
	}
	if leave {
		if err := a.pool.Leave(3 * time.Second); err != nil {
			a.log.Warn("leaving the gossip pool", "agent", a.id, "err", err)
		} else {
			a.log.Info("left the gossip pool", "agent", a.id)
		}
	}
	_ = a.pool.Shutdown()
}
