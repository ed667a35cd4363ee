package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/raft"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
	"google.golang.org/protobuf/proto"
)

// clusterService implements kiln.v1.ClusterService.
type clusterService struct{ c *Coordinator }

var _ kilnv1connect.ClusterServiceHandler = clusterService{}

func (s clusterService) Apply(ctx context.Context, req *connect.Request[kilnv1.ApplyRequest]) (*connect.Response[kilnv1.ApplyResponse], error) {
	var e pb.Entry
	if err := proto.Unmarshal(req.Msg.Entry, &e); err != nil {
		return nil, rpc.Error(fmt.Errorf("%w: undecodable entry: %v", raftfsm.ErrInvalid, err))
	}
	c := s.c
	if !c.IsLeader() {
		ce := connect.NewError(connect.CodeUnavailable, errors.New("not the leader"))
		ce.Meta().Set(headerRetry, "1")
		return nil, ce
	}
	if err := c.stamp(e.Commands); err != nil {
		return nil, rpc.Error(err)
	}
	res, err := c.prop.propose(ctx, e.Commands)
	if err != nil {
		if errors.Is(err, errNotLeaderRetry) {
			ce := connect.NewError(connect.CodeUnavailable, err)
			ce.Meta().Set(headerRetry, "1")
			return nil, ce
		}
		return nil, rpc.Error(err)
	}
	out := &kilnv1.ApplyResponse{Index: res.Index}
	for _, r := range res.Results {
		cr := &kilnv1.CommandResult{Id: r.ID}
		if r.Err != nil {
			cr.ErrorKind, cr.Error = raftfsm.Kind(r.Err), r.Err.Error()
		}
		out.Results = append(out.Results, cr)
	}
	return connect.NewResponse(out), nil
}

func (s clusterService) Join(ctx context.Context, req *connect.Request[kilnv1.JoinRequest]) (*connect.Response[kilnv1.JoinResponse], error) {
	m := req.Msg
	if m.NodeId == "" || m.RaftAddr == "" || m.HttpAddr == "" {
		return nil, rpc.Error(fmt.Errorf("%w: join needs node_id, raft_addr and http_addr", raftfsm.ErrInvalid))
	}
	c := s.c
	if !c.IsLeader() {
		client, err := c.leaderClient(ctx)
		if err != nil {
			return nil, rpc.Error(err)
		}
		return client.Join(ctx, connect.NewRequest(m))
	}
	if err := c.addVoter(ctx, m.NodeId, m.RaftAddr, m.HttpAddr); err != nil {
		return nil, rpc.Error(err)
	}
	return connect.NewResponse(&kilnv1.JoinResponse{LeaderId: c.id}), nil
}

func (s clusterService) Members(ctx context.Context, _ *connect.Request[kilnv1.MembersRequest]) (*connect.Response[kilnv1.MembersResponse], error) {
	ms, leader, err := s.c.members()
	if err != nil {
		return nil, rpc.Error(err)
	}
	out := &kilnv1.MembersResponse{Members: ms, LeaderId: leader, AppliedIndex: s.c.fsm.AppliedIndex()}
	if s.c.pool != nil {
		for _, m := range s.c.pool.Members() {
			out.Gossip = append(out.Gossip, &kilnv1.GossipMember{Name: m.Name, Addr: m.Addr, State: m.State, Role: string(m.Meta.Role),
				NodeId: m.Meta.NodeID, AgentId: m.Meta.AgentID})
		}
		slices.SortFunc(out.Gossip, func(a, b *kilnv1.GossipMember) int { return strings.Compare(a.Name, b.Name) })
	}
	return connect.NewResponse(out), nil
}

func (s clusterService) RemoveServer(ctx context.Context, req *connect.Request[kilnv1.RemoveServerRequest]) (*connect.Response[kilnv1.RemoveServerResponse], error) {
	m := req.Msg
	if m.NodeId == "" {
		return nil, rpc.Error(fmt.Errorf("%w: remove needs a node_id", raftfsm.ErrInvalid))
	}
	c := s.c
	return onLeader(ctx, c,
		func(ctx context.Context) (*kilnv1.RemoveServerResponse, error) {
			if err := c.removeServerByOperator(ctx, m.NodeId); err != nil {
				return nil, err
			}
			ms, _, err := c.members()
			if err != nil {
				return nil, err
			}
			return &kilnv1.RemoveServerResponse{LeaderId: c.id, Members: ms}, nil
		},
		func(ctx context.Context, leader kilnv1connect.ClusterServiceClient) (*connect.Response[kilnv1.RemoveServerResponse], error) {
			return leader.RemoveServer(ctx, connect.NewRequest(m))
		})
}

func (s clusterService) TransferLeadership(ctx context.Context, req *connect.Request[kilnv1.TransferLeadershipRequest]) (*connect.Response[kilnv1.TransferLeadershipResponse], error) {
	m := req.Msg
	c := s.c
	return onLeader(ctx, c,
		func(ctx context.Context) (*kilnv1.TransferLeadershipResponse, error) {
			return c.transferLeadership(ctx, m.ToNodeId)
		},
		func(ctx context.Context, leader kilnv1connect.ClusterServiceClient) (*connect.Response[kilnv1.TransferLeadershipResponse], error) {
			return leader.TransferLeadership(ctx, connect.NewRequest(m))
		})
}

// onLeader runs local when this node is the ready leader and otherwise
// sends the call to the leader with remote (whose answer, error codes
// included, goes back as it is). While leadership is moving (no leader
// known, or this node leads but is not ready yet) it waits and tries
// again, within ctx and the apply timeout; local must only fail with
// errNotLeaderRetry when it did nothing.
func onLeader[T any](ctx context.Context, c *Coordinator,
	local func(context.Context) (*T, error),
	remote func(context.Context, kilnv1connect.ClusterServiceClient) (*connect.Response[T], error),
) (*connect.Response[T], error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ApplyTimeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		var err error
		if c.IsLeader() {
			var out *T
			if out, err = local(ctx); err == nil {
				return connect.NewResponse(out), nil
			}
		} else {
			var leader kilnv1connect.ClusterServiceClient
			if leader, err = c.leaderClient(ctx); err == nil {
				return remote(ctx, leader)
			}
		}
		if !errors.Is(err, errNotLeaderRetry) {
			return nil, rpc.Error(err)
		}
		if werr := c.waitLeaderChange(ctx, retryBackoff(attempt)); werr != nil {
			ce := connect.NewError(connect.CodeUnavailable, err)
			ce.Meta().Set(headerRetry, "1")
			return nil, ce
		}
	}
}

// removeServer takes a server out of the Raft configuration, then deletes
// its Node record. It runs on the leader. A record whose server is no
// longer a member (a removal that stopped half-way, a replaced node) is
// deleted too, so a failed removal can simply be repeated.
func (c *Coordinator) removeServer(ctx context.Context, id string) error {
	f := c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return raftError(err)
	}
	var target *raft.Server
	voters := 0
	for _, srv := range f.Configuration().Servers {
		if srv.Suffrage == raft.Voter {
			voters++
		}
		if srv.ID == raft.ServerID(id) {
			target = &srv
		}
	}
	if target == nil {
		n, err := c.fsm.Read().Node(id)
		if errors.Is(err, raftfsm.ErrNotFound) || err == nil && n.Removed {
			return fmt.Errorf("%w: %q is not a member of the cluster", raftfsm.ErrNotFound, id)
		}
		if err != nil {
			return err
		}
		c.log.Info("forgetting the addresses of a server no longer in the configuration", "id", id)
		return c.deleteNode(ctx, id)
	}
	if target.Suffrage == raft.Voter && voters <= 1 {
		return fmt.Errorf("%w: %s is the last voter; removing it would leave the cluster without one", raftfsm.ErrConflict, id)
	}
	if id == c.id {
		return fmt.Errorf("%w: %s is the leader; transfer leadership first", raftfsm.ErrConflict, id)
	}
	// prevIndex makes the change fail if the configuration moved since it
	// was checked above.
	if err := c.raft.RemoveServer(target.ID, f.Index(), c.cfg.ApplyTimeout).Error(); err != nil {
		return raftError(err)
	}
	c.log.Info("removed server", "id", id, "raft", target.Address, "voters_left", voters-btoi(target.Suffrage == raft.Voter))
	return c.deleteNode(ctx, id)
}

// deleteNode deletes a Node record; a missing one is not an error.
func (c *Coordinator) deleteNode(ctx context.Context, id string) error {
	err := c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_DELETE_NODE, &pb.DeleteNode{Id: id})
	if errors.Is(err, raftfsm.ErrNotFound) {
		return nil
	}
	return err
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// transferLeadership hands leadership to the voter to (any other voter
// when empty) and returns once this node has heard from a new leader. It
// runs on the leader; naming the leader itself changes nothing.
func (c *Coordinator) transferLeadership(ctx context.Context, to string) (*kilnv1.TransferLeadershipResponse, error) {
	if to == c.id {
		return &kilnv1.TransferLeadershipResponse{OldLeaderId: c.id, LeaderId: c.id}, nil
	}
	f := c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, raftError(err)
	}
	var target *raft.Server
	others := 0
	for _, srv := range f.Configuration().Servers {
		if srv.ID != raft.ServerID(c.id) && srv.Suffrage == raft.Voter {
			others++
		}
		if to != "" && srv.ID == raft.ServerID(to) {
			target = &srv
		}
	}
	switch {
	case to != "" && target == nil:
		return nil, fmt.Errorf("%w: %q is not a member of the cluster", raftfsm.ErrNotFound, to)
	case target != nil && target.Suffrage != raft.Voter:
		return nil, fmt.Errorf("%w: %s is not a voter and cannot lead", raftfsm.ErrConflict, to)
	case others == 0:
		return nil, fmt.Errorf("%w: no other voter to hand leadership to", raftfsm.ErrConflict)
	}
	start := time.Now()
	if target == nil {
		target = c.pickSuccessor(ctx, f.Configuration().Servers)
	}
	if err := c.transferTo(ctx, target); err != nil {
		c.log.Warn("leadership transfer failed", "to", to, "err", err)
		if errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			return nil, fmt.Errorf("%w: a leadership transfer is already under way", raftfsm.ErrConflict)
		}
		return nil, raftError(err)
	}
	leader, err := c.awaitOtherLeader(ctx)
	if err != nil {
		return nil, err
	}
	c.log.Info("transferred leadership", "to", leader, "took", time.Since(start))
	return &kilnv1.TransferLeadershipResponse{OldLeaderId: c.id, LeaderId: leader}, nil
}

// awaitOtherLeader waits (within ctx) until this node knows of a leader
// other than itself and returns its ID.
func (c *Coordinator) awaitOtherLeader(ctx context.Context) (string, error) {
	for {
		ch := c.leaderChangeCh()
		if _, id := c.raft.LeaderWithID(); id != "" && id != raft.ServerID(c.id) {
			return string(id), nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return "", fmt.Errorf("%w: leadership was handed off but no new leader has been heard from: %v", raftfsm.ErrUnavailable, ctx.Err())
		}
	}
}

// handOffTimeout bounds the leadership hand-off of a graceful Close.
const handOffTimeout = 5 * time.Second

// handOffLeadership is the first step of Close: a leader with another
// voter hands leadership over (waiting at most handOffTimeout) so the
// cluster need not wait out an election timeout to elect a new one. A
// leader that cannot reach a quorum any more (its peers are gone) does
// not try: nobody could win an election. A failed hand-off is logged and
// Close goes on. It returns the new leader's ID, or "" when there was no
// hand-off.
func (c *Coordinator) handOffLeadership() string {
	if c.raft == nil || c.raft.State() != raft.Leader {
		return ""
	}
	f := c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		c.log.Warn("no leadership hand-off: reading the configuration", "err", err)
		return ""
	}
	others := 0
	for _, srv := range f.Configuration().Servers {
		if srv.ID != raft.ServerID(c.id) && srv.Suffrage == raft.Voter {
			others++
		}
	}
	if others == 0 {
		c.log.Info("no leadership hand-off: this node is the only voter")
		return ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), handOffTimeout)
	defer cancel()
	start := time.Now()
	if err := futureError(ctx, c.raft.VerifyLeader()); err != nil {
		c.log.Warn("no leadership hand-off: this node no longer reaches a quorum", "err", err, "took", time.Since(start))
		return ""
	}
	c.log.Info("handing off leadership before closing", "other_voters", others)
	if err := c.transferTo(ctx, c.pickSuccessor(ctx, f.Configuration().Servers)); err != nil {
		c.log.Warn("leadership hand-off failed; closing anyway", "err", err, "took", time.Since(start))
		return ""
	}
	// The transfer ends when this node steps down; the successor is
	// normally heard from within a round trip. Do not wait for one much
	// longer than an election would take.
	wctx, wcancel := context.WithTimeout(ctx, 2*c.raft.ReloadableConfig().ElectionTimeout)
	defer wcancel()
	to, err := c.awaitOtherLeader(wctx)
	if err != nil {
		c.log.Warn("leadership hand-off: no new leader heard from; closing anyway", "err", err, "took", time.Since(start))
		return ""
	}
	c.log.Info("handed off leadership", "to", to, "took", time.Since(start))
	return to
}

// transferTo starts a leadership transfer to srv, or to the voter Raft
// picks (the most up-to-date) when srv is nil, and waits for its end.
func (c *Coordinator) transferTo(ctx context.Context, srv *raft.Server) error {
	if srv == nil {
		c.log.Info("transferring leadership to the voter Raft picks")
		return futureError(ctx, c.raft.LeadershipTransfer())
	}
	c.log.Info("transferring leadership", "to", srv.ID)
	return futureError(ctx, c.raft.LeadershipTransferToServer(srv.ID, srv.Address))
}

// probeTimeout bounds the readiness probe of possible successors.
const probeTimeout = 500 * time.Millisecond

// pickSuccessor returns the first other voter (in configuration order)
// whose /ready answers 200, probing them all at once, or nil when none
// does. Raft's own pick (the highest replication index) can fall on a
// voter that is down, as during a rolling restart; a transfer to it
// fails only after an election timeout.
func (c *Coordinator) pickSuccessor(ctx context.Context, servers []raft.Server) *raft.Server {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	r := c.fsm.Read()
	ready := make([]chan bool, len(servers))
	for i, srv := range servers {
		ready[i] = make(chan bool, 1)
		if srv.ID == raft.ServerID(c.id) || srv.Suffrage != raft.Voter {
			ready[i] <- false
			continue
		}
		n, err := r.Node(string(srv.ID))
		if err != nil {
			ready[i] <- false
			continue
		}
		go func() { ready[i] <- c.peerReady(ctx, n.HttpAddr) }()
	}
	var pick *raft.Server
	for i := range servers {
		if <-ready[i] && pick == nil {
			pick = &servers[i]
		}
	}
	return pick
}

// peerReady reports whether the coordinator at httpAddr answers /ready
// with 200 (it runs, knows the leader and has caught up).
func (c *Coordinator) peerReady(ctx context.Context, httpAddr string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+httpAddr+"/ready", nil)
	if err != nil {
		return false
	}
	resp, err := c.httpClient.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	return resp.StatusCode == http.StatusOK
}

// futureError waits for a Raft future within ctx. With BatchApplyCh,
// hashicorp/raft never answers an Apply or Barrier future that is still
// queued when it shuts down, so every wait on one must also end with ctx;
// the goroutine left waiting for such a future ends only if it is answered.
func futureError(ctx context.Context, f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// members lists the Raft configuration with each node's HTTP address.
func (c *Coordinator) members() ([]*kilnv1.Member, string, error) {
	f := c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, "", fmt.Errorf("%w: %v", raftfsm.ErrUnavailable, err)
	}
	_, leader := c.raft.LeaderWithID()
	r := c.fsm.Read()
	var out []*kilnv1.Member
	for _, srv := range f.Configuration().Servers {
		m := &kilnv1.Member{Id: string(srv.ID), RaftAddr: string(srv.Address), Voter: srv.Suffrage == raft.Voter, Leader: srv.ID == leader}
		if n, err := r.Node(string(srv.ID)); err == nil {
			m.HttpAddr, m.GossipAddr = n.HttpAddr, n.GossipAddr
		}
		out = append(out, m)
	}
	return out, string(leader), nil
}

// addVoter adds (or re-addresses) a server and records its HTTP address.
func (c *Coordinator) addVoter(ctx context.Context, id, raftAddr, httpAddr string) error {
	f := c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("%w: %v", raftfsm.ErrUnavailable, err)
	}
	present := false
	for _, srv := range f.Configuration().Servers {
		switch {
		case srv.ID == raft.ServerID(id) && srv.Address == raft.ServerAddress(raftAddr):
			present = true
		case srv.ID == raft.ServerID(id) || srv.Address == raft.ServerAddress(raftAddr):
			if srv.ID == raft.ServerID(c.id) {
				return fmt.Errorf("%w: %s conflicts with the leader itself", raftfsm.ErrConflict, id)
			}
			c.log.Info("replacing server", "old_id", srv.ID, "old_addr", srv.Address, "id", id, "addr", raftAddr)
			if err := c.raft.RemoveServer(srv.ID, 0, c.cfg.ApplyTimeout).Error(); err != nil {
				return raftError(err)
			}
		}
	}
	if !present {
		if err := c.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, c.cfg.ApplyTimeout).Error(); err != nil {
			return raftError(err)
		}
		c.log.Info("added voter", "id", id, "raft", raftAddr, "http", httpAddr)
	}
	return c.putNode(ctx, &pb.Node{Id: id, RaftAddr: raftAddr, HttpAddr: httpAddr})
}

func (c *Coordinator) putNode(ctx context.Context, n *pb.Node) error {
	if cur, err := c.fsm.Read().Node(n.Id); err == nil && proto.Equal(cur, n) {
		return nil
	}
	return c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_PUT_NODE, &pb.PutNode{Node: n})
}

// registerSelf records the leader's own addresses (a bootstrapped node
// never joins through anyone).
func (c *Coordinator) registerSelf(ctx context.Context) {
	for attempt := 0; ; attempt++ {
		err := c.putNode(ctx, &pb.Node{Id: c.id, RaftAddr: c.raftAddr, HttpAddr: c.httpAddr, GossipAddr: c.GossipAddr()})
		if err == nil || ctx.Err() != nil {
			return
		}
		c.log.Warn("registering this node", "err", err)
		if waitErr := sleepCtx(ctx, retryBackoff(attempt)); waitErr != nil {
			return
		}
	}
}

// joinVia asks the member at base (an HTTP URL) to add this node.
func (c *Coordinator) joinVia(ctx context.Context, base string) error {
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	u, err := url.Parse(base)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%w: join address %q", raftfsm.ErrInvalid, base)
	}
	client := c.peerClient(u.Host)
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ApplyTimeout)
	defer cancel()
	_, err = client.Join(ctx, connect.NewRequest(&kilnv1.JoinRequest{NodeId: c.id, RaftAddr: c.raftAddr, HttpAddr: c.httpAddr}))
	return err
}
