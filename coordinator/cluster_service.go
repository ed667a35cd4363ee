package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"

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
	return connect.NewResponse(&kilnv1.MembersResponse{Members: ms, LeaderId: leader, AppliedIndex: s.c.fsm.AppliedIndex()}), nil
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
			m.HttpAddr = n.HttpAddr
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
		err := c.putNode(ctx, &pb.Node{Id: c.id, RaftAddr: c.raftAddr, HttpAddr: c.httpAddr})
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
