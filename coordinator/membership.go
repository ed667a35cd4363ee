package coordinator

import (
	"context"
	"slices"
	"time"

	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/gossip"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Membership: the coordinator's side of the gossip pool. Gossip grants
// nothing — agents get work only with their Connect credential, servers
// become voters only through Raft — it is used for failure detection,
// discovery and bootstrapping.

// agentDeadQuiet: a lease of an agent the pool declared dead is expired
// once the agent has also been silent on Connect this long (so a gossip
// partition alone does not take work away from a heartbeating agent).
const agentDeadQuiet = 5 * time.Second

// startGossip joins the pool when a gossip address is configured.
func (c *Coordinator) startGossip(ctx context.Context) error {
	if c.cfg.GossipAddr == "" {
		return nil
	}
	pool, err := gossip.New(gossip.Config{
		Name: c.id, BindAddr: c.cfg.GossipAddr, AdvertiseAddr: c.cfg.AdvertiseGossip, KeyFile: c.cfg.GossipKeyFile,
		Meta:          gossip.Meta{Role: gossip.RoleCoordinator, NodeID: c.id, HTTPAddr: c.httpAddr, RaftAddr: c.raftAddr},
		Logger:        c.log,
		OnEvent:       c.onGossipEvent,
		ProbeInterval: c.cfg.GossipProbeInterval,
	})
	if err != nil {
		return err
	}
	c.pool = pool
	if len(c.cfg.RetryJoin) > 0 {
		c.goLoop(func() {
			if err := pool.RetryJoin(ctx, c.cfg.RetryJoin, 2*time.Second); err == nil {
				c.log.Info("joined the gossip pool", "via", c.cfg.RetryJoin)
			}
		})
	}
	if c.cfg.BootstrapExpect > 0 {
		c.goLoop(func() { c.runBootstrapExpectLoop(ctx) })
	}
	return nil
}

// GossipAddr is this node's address in the pool ("" without gossip).
func (c *Coordinator) GossipAddr() string {
	if c.pool == nil {
		return ""
	}
	return c.pool.LocalAddr()
}

// stopGossip leaves the pool (when configured to) and shuts it down.
func (c *Coordinator) stopGossip() {
	if c.pool == nil {
		return
	}
	if c.cfg.LeaveOnTerminate {
		if err := c.pool.Leave(3 * time.Second); err != nil {
			c.log.Warn("leaving the gossip pool", "err", err)
		}
	}
	_ = c.pool.Shutdown()
}

// onGossipEvent runs on the pool's delivery goroutine.
func (c *Coordinator) onGossipEvent(e gossip.Event) {
	m := e.Member
	switch m.Meta.Role {
	case gossip.RoleAgent:
		live := c.live()
		if live == nil || m.Meta.AgentID == "" {
			return
		}
		live.mu.Lock()
		switch e.Kind {
		case gossip.EventDead, gossip.EventLeave:
			live.gossipGone[m.Meta.AgentID] = time.Now()
		case gossip.EventJoin, gossip.EventUpdate:
			delete(live.gossipGone, m.Meta.AgentID)
		}
		live.mu.Unlock()
		if e.Kind == gossip.EventDead {
			c.log.Warn("agent declared dead by gossip", "agent", m.Meta.AgentID, "member", m.Name)
		}
		live.nudge()
	case gossip.RoleCoordinator:
		if live := c.live(); live != nil {
			live.nudge()
		}
	}
}

// GossipAgents maps agent IDs to their state in this node's view of the
// pool ("alive", "dead", "left"); nil without gossip.
func (c *Coordinator) GossipAgents() map[string]string {
	if c.pool == nil {
		return nil
	}
	out := map[string]string{}
	for _, m := range c.pool.Members() {
		if m.Meta.Role == gossip.RoleAgent && m.Meta.AgentID != "" {
			if prev, ok := out[m.Meta.AgentID]; !ok || prev != gossip.StateAlive {
				out[m.Meta.AgentID] = m.State
			}
		}
	}
	return out
}

// runBootstrapExpectLoop bootstraps Raft once BootstrapExpect coordinators
// are in the pool and none of them is part of a cluster yet. Every one of
// them bootstraps with the same configuration, which Raft allows.
func (c *Coordinator) runBootstrapExpectLoop(ctx context.Context) {
	if c.raft.LastIndex() > 0 {
		return // state exists: nothing to bootstrap
	}
	warned := false
	for sleepCtx(ctx, 300*time.Millisecond) == nil {
		if _, id := c.raft.LeaderWithID(); id != "" || c.raft.LastIndex() > 0 {
			return
		}
		var servers []raft.Server
		for _, m := range c.pool.Members() {
			if m.State == gossip.StateAlive && m.Meta.Role == gossip.RoleCoordinator && m.Meta.NodeID != "" && m.Meta.RaftAddr != "" {
				servers = append(servers, raft.Server{ID: raft.ServerID(m.Meta.NodeID), Address: raft.ServerAddress(m.Meta.RaftAddr), Suffrage: raft.Voter})
			}
		}
		if len(servers) < c.cfg.BootstrapExpect {
			continue
		}
		if len(servers) > c.cfg.BootstrapExpect {
			if !warned {
				c.log.Warn("more coordinators in the pool than --bootstrap-expect: waiting to be added by a leader", "seen", len(servers), "expect", c.cfg.BootstrapExpect)
				warned = true
			}
			continue
		}
		if c.peerHasCluster(ctx) {
			c.log.Info("a peer already belongs to a cluster: waiting to be added")
			return
		}
		slices.SortFunc(servers, func(a, b raft.Server) int { return compareIDs(a.ID, b.ID) })
		if err := c.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
			c.log.Warn("bootstrap", "err", err)
			return
		}
		c.log.Info("bootstrapped Raft with the expected coordinators", "servers", len(servers))
		return
	}
}

func compareIDs(a, b raft.ServerID) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// peerHasCluster asks the other coordinators of the pool whether one of
// them already knows a leader or a configuration.
func (c *Coordinator) peerHasCluster(ctx context.Context) bool {
	for _, m := range c.pool.Members() {
		if m.Meta.Role != gossip.RoleCoordinator || m.Meta.NodeID == c.id || m.State != gossip.StateAlive {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		v, err := c.peerCluster(rctx, m.Meta.HTTPAddr)
		cancel()
		if err == nil && (v.Leader != "" || len(v.Members) > 0) {
			return true
		}
	}
	return false
}

// runMembershipLoop (leader only) keeps Raft in step with the pool: alive
// coordinators that are not voters are added; voters that left the pool
// are removed; voters dead for DeadServerCleanup are removed when at least
// MinQuorum voters remain (as autopilot's dead-server cleanup). Node
// records follow the members' addresses.
func (c *Coordinator) runMembershipLoop(ctx context.Context, live *liveness) {
	if c.pool == nil {
		return
	}
	deadSince := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-live.wake:
		case <-time.After(jitter(2 * time.Second)):
		}
		if !c.IsLeader() {
			continue
		}
		c.reconcileMembers(ctx, deadSince)
	}
}

func (c *Coordinator) reconcileMembers(ctx context.Context, deadSince map[string]time.Time) {
	f := c.raft.GetConfiguration()
	if f.Error() != nil {
		return
	}
	servers := f.Configuration().Servers
	members := map[string]gossip.Member{}
	for _, m := range c.pool.Members() {
		if m.Meta.Role != gossip.RoleCoordinator || m.Meta.NodeID == "" {
			continue
		}
		if prev, ok := members[m.Meta.NodeID]; ok && prev.State == gossip.StateAlive {
			continue
		}
		members[m.Meta.NodeID] = m
	}
	rd := c.fsm.Read()
	for id, m := range members {
		if m.State != gossip.StateAlive || c.wasRemoved(id) {
			continue
		}
		inConf := slices.ContainsFunc(servers, func(s raft.Server) bool { return string(s.ID) == id })
		if !inConf {
			if err := c.addVoter(ctx, id, m.Meta.RaftAddr, m.Meta.HTTPAddr); err != nil {
				c.log.Warn("adding a coordinator found by gossip", "node", id, "err", err)
				continue
			}
			c.log.Info("added a coordinator found by gossip", "node", id, "raft", m.Meta.RaftAddr)
		}
		if n, err := rd.Node(id); err != nil || n.GossipAddr != m.Addr || n.HttpAddr != m.Meta.HTTPAddr {
			if err := c.putNode(ctx, &pb.Node{Id: id, RaftAddr: m.Meta.RaftAddr, HttpAddr: m.Meta.HTTPAddr, GossipAddr: m.Addr}); err != nil {
				c.log.Warn("recording a coordinator's addresses", "node", id, "err", err)
			}
		}
	}
	voters := 0
	for _, s := range servers {
		if s.Suffrage == raft.Voter {
			voters++
		}
	}
	now := time.Now()
	for _, s := range servers {
		id := string(s.ID)
		m, known := members[id]
		if id == c.id || !known || m.State == gossip.StateAlive {
			delete(deadSince, id)
			continue
		}
		if _, ok := deadSince[id]; !ok {
			deadSince[id] = now
		}
		remove := m.State == gossip.StateLeft && voters > 1 ||
			m.State == gossip.StateDead && now.Sub(deadSince[id]) >= c.cfg.DeadServerCleanup && voters-1 >= c.cfg.MinQuorum
		if !remove {
			continue
		}
		if err := c.removeServer(ctx, id); err != nil {
			c.log.Warn("removing a failed coordinator", "node", id, "state", m.State, "err", err)
			continue
		}
		voters--
		delete(deadSince, id)
		c.log.Warn("removed a coordinator the pool declared "+m.State, "node", id)
	}
}

// wasRemoved reports whether an operator removed the node: a replicated
// tombstone (its Node record, marked removed), so every future leader
// knows not to add it back while it lives.
func (c *Coordinator) wasRemoved(id string) bool {
	n, err := c.fsm.Read().Node(id)
	return err == nil && n.Removed
}

// removeServerByOperator removes a server as `kiln cluster remove` does,
// leaving a tombstone so gossip does not add it back while it lives.
func (c *Coordinator) removeServerByOperator(ctx context.Context, id string) error {
	if err := c.removeServer(ctx, id); err != nil {
		return err
	}
	return c.putNode(ctx, &pb.Node{Id: id, Removed: true})
}
