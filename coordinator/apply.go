package coordinator

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// Apply commits commands through Raft, from any node: on the leader they
// are proposed directly, elsewhere forwarded to the leader. It returns once
// the commands are committed and applied on this node, so a read that
// follows sees them.
func (c *Coordinator) Apply(ctx context.Context, cmds ...*pb.Command) (*raftfsm.EntryResult, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ApplyTimeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		res, err := c.applyOnce(ctx, cmds)
		if err == nil {
			if werr := c.fsm.waitApplied(ctx, res.Index); werr != nil {
				return nil, fmt.Errorf("%w: committed at %d but not yet applied here: %v", raftfsm.ErrUnavailable, res.Index, werr)
			}
			return res, nil
		}
		if !errors.Is(err, errNotLeaderRetry) {
			return nil, err
		}
		// Leadership is moving: wait for it to settle, then resend.
		if werr := c.waitLeaderChange(ctx, retryBackoff(attempt)); werr != nil {
			return nil, fmt.Errorf("%w: no leader: %v", raftfsm.ErrNoLeader, werr)
		}
	}
}

func (c *Coordinator) applyOnce(ctx context.Context, cmds []*pb.Command) (*raftfsm.EntryResult, error) {
	if c.raft.State() == raft.Leader {
		if !c.leaderReady.Load() {
			return nil, fmt.Errorf("%w: leader is starting", errNotLeaderRetry)
		}
		if err := c.stamp(cmds); err != nil {
			return nil, err
		}
		return c.prop.propose(ctx, cmds)
	}
	return c.forward(ctx, cmds)
}

// stamp fills in what only the leader may decide: the time and new IDs.
func (c *Coordinator) stamp(cmds []*pb.Command) error {
	now := time.Now().Unix()
	for _, cmd := range cmds {
		cmd.Now = now
		var err error
		switch cmd.Type {
		case pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD:
			err = c.stampPayload(cmd, &pb.SubmitBuild{}, func(m proto.Message) error {
				return c.stampBuild(m.(*pb.SubmitBuild))
			})
		case pb.CommandType_COMMAND_TYPE_CREATE_EVAL:
			err = c.stampPayload(cmd, &pb.CreateEval{}, func(m proto.Message) error {
				for _, sb := range m.(*pb.CreateEval).Builds {
					if err := c.stampBuild(sb); err != nil {
						return err
					}
				}
				return nil
			})
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// stampPayload decodes a command's payload into m, lets fn stamp it and
// encodes it back.
func (c *Coordinator) stampPayload(cmd *pb.Command, m proto.Message, fn func(proto.Message) error) error {
	if err := proto.Unmarshal(cmd.Payload, m); err != nil {
		return fmt.Errorf("%w: undecodable %s: %v", raftfsm.ErrInvalid, cmd.Type, err)
	}
	if err := fn(m); err != nil {
		return err
	}
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	cmd.Payload = b
	return nil
}

// stampBuild gives a submission without an ID the next build ID.
func (c *Coordinator) stampBuild(m *pb.SubmitBuild) error {
	if m.Build == nil {
		return fmt.Errorf("%w: missing build", raftfsm.ErrInvalid)
	}
	if m.Build.Id == 0 {
		m.Build.Id = c.nextBuildID.Add(1)
	}
	return nil
}

// forward sends the commands to the leader's ClusterService.Apply.
func (c *Coordinator) forward(ctx context.Context, cmds []*pb.Command) (*raftfsm.EntryResult, error) {
	client, err := c.leaderClient(ctx)
	if err != nil {
		return nil, err
	}
	data, err := raftfsm.EncodeEntry(cmds)
	if err != nil {
		return nil, err
	}
	resp, err := client.Apply(ctx, connect.NewRequest(&kilnv1.ApplyRequest{Entry: data}))
	if err != nil {
		var ce *connect.Error
		if errors.As(err, &ce) && ce.Code() == connect.CodeUnavailable && ce.Meta().Get(headerRetry) != "" {
			return nil, fmt.Errorf("%w: %w", raftfsm.ErrNoLeader, errNotLeaderRetry)
		}
		if errors.As(err, &ce) {
			return nil, rpc.DomainError(err)
		}
		// The leader could not be reached: it may be gone; try again.
		return nil, fmt.Errorf("%w: leader unreachable: %v: %w", raftfsm.ErrNoLeader, err, errNotLeaderRetry)
	}
	res := &raftfsm.EntryResult{Index: resp.Msg.Index}
	for _, r := range resp.Msg.Results {
		res.Results = append(res.Results, raftfsm.CommandResult{ID: r.Id, Err: raftfsm.FromKind(r.ErrorKind, r.Error)})
	}
	if len(res.Results) != len(cmds) {
		return nil, fmt.Errorf("%w: leader returned %d results for %d commands", raftfsm.ErrUnavailable, len(res.Results), len(cmds))
	}
	return res, nil
}

// headerRetry marks an Unavailable answer to a write that was not appended.
const headerRetry = "Kiln-Retry"

// leaderClient returns a ClusterService client for the current leader,
// waiting (within ctx) until the leader and its HTTP address are known.
func (c *Coordinator) leaderClient(ctx context.Context) (kilnv1connect.ClusterServiceClient, error) {
	for {
		ch := c.leaderChangeCh()
		_, id := c.raft.LeaderWithID()
		if id != "" {
			if id == raft.ServerID(c.id) {
				return nil, fmt.Errorf("%w: this node leads now", errNotLeaderRetry)
			}
			n, err := c.fsm.Read().Node(string(id))
			if err == nil {
				return c.peerClient(n.HttpAddr), nil
			}
			if !errors.Is(err, raftfsm.ErrNotFound) {
				return nil, err
			}
			// The leader has not registered its HTTP address yet.
			if err := waitAny(ctx, ch, c.fsm.changedCh()); err != nil {
				return nil, fmt.Errorf("%w: leader %s has no known HTTP address: %v", raftfsm.ErrNoLeader, id, err)
			}
			continue
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %v", raftfsm.ErrNoLeader, ctx.Err())
		}
	}
}

func waitAny(ctx context.Context, chs ...<-chan struct{}) error {
	cases := make(chan struct{})
	stop := make(chan struct{})
	defer close(stop)
	for _, ch := range chs {
		go func() {
			select {
			case <-ch:
				select {
				case cases <- struct{}{}:
				case <-stop:
				}
			case <-stop:
			}
		}()
	}
	select {
	case <-cases:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (n *notifyingFSM) changedCh() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.changed
}

// peerClient returns a (cached) ClusterService client for a peer's HTTP address.
func (c *Coordinator) peerClient(httpAddr string) kilnv1connect.ClusterServiceClient {
	c.peersMu.Lock()
	defer c.peersMu.Unlock()
	if cl, ok := c.peers[httpAddr]; ok {
		return cl
	}
	cl := kilnv1connect.NewClusterServiceClient(c.httpClient, "http://"+httpAddr,
		connect.WithInterceptors(rpc.WithBearer(c.cfg.AdminToken)),
		connect.WithReadMaxBytes(int(c.cfg.MaxBodyBytes)), connect.WithSendMaxBytes(int(c.cfg.MaxBodyBytes)))
	c.peers[httpAddr] = cl
	return cl
}

func newHTTPClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 256
	t.MaxIdleConns = 1024
	return &http.Client{Transport: t}
}

// leaderChangeCh returns a channel closed at the next leadership change.
func (c *Coordinator) leaderChangeCh() <-chan struct{} {
	c.leaderMu.Lock()
	defer c.leaderMu.Unlock()
	return c.leaderChanged
}

func (c *Coordinator) signalLeaderChange() {
	c.leaderMu.Lock()
	close(c.leaderChanged)
	c.leaderChanged = make(chan struct{})
	c.leaderMu.Unlock()
}

// retryBackoff is the jittered pause before resending a write that found
// no ready leader: 5 ms doubling to 500 ms.
func retryBackoff(attempt int) time.Duration {
	d := 5 * time.Millisecond << min(attempt, 7)
	d = min(d, 500*time.Millisecond)
	return d/2 + rand.N(d/2+1)
}

// waitLeaderChange waits, after a pause, until a leader is known and ready
// to take writes (this node as ready leader, or another node); a leadership
// change ends the pause early.
func (c *Coordinator) waitLeaderChange(ctx context.Context, pause time.Duration) error {
	t := time.NewTimer(pause)
	defer t.Stop()
	ch := c.leaderChangeCh()
	select {
	case <-ch:
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	for {
		ch := c.leaderChangeCh()
		_, id := c.raft.LeaderWithID()
		if id != "" && (id != raft.ServerID(c.id) || c.leaderReady.Load()) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
