package coordinator

import (
	"context"
	"fmt"

	"connectrpc.com/connect"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// SubmitBuild validates and commits a build submission and returns the
// stored build. Derivations already queued are shared.
func (c *Coordinator) SubmitBuild(ctx context.Context, m *pb.SubmitBuild) (*pb.Build, error) {
	if _, err := raftfsm.ValidateSubmit(m); err != nil {
		return nil, err
	}
	m.Build.Id = 0 // the leader stamps it
	cmd, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, m, 0)
	if err != nil {
		return nil, err
	}
	return c.applyBuildCommand(ctx, cmd)
}

// CancelBuild cancels a queued build.
func (c *Coordinator) CancelBuild(ctx context.Context, id uint64, reason string) (*pb.Build, error) {
	if id == 0 {
		return nil, fmt.Errorf("%w: build id 0", raftfsm.ErrInvalid)
	}
	if _, err := c.fsm.Read().Build(id); err != nil {
		return nil, err
	}
	cmd, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_CANCEL_BUILD, &pb.CancelBuild{Id: id, Reason: reason}, 0)
	if err != nil {
		return nil, err
	}
	return c.applyBuildCommand(ctx, cmd)
}

func (c *Coordinator) applyBuildCommand(ctx context.Context, cmd *pb.Command) (*pb.Build, error) {
	res, err := c.Apply(ctx, cmd)
	if err != nil {
		return nil, err
	}
	if err := res.Results[0].Err; err != nil {
		return nil, err
	}
	return c.fsm.Read().Build(res.Results[0].ID)
}

// Read returns a consistent view of this node's replica.
func (c *Coordinator) Read() *raftfsm.Reader { return c.fsm.Read() }

// AppliedIndex is the last Raft index applied on this node.
func (c *Coordinator) AppliedIndex() uint64 { return c.fsm.AppliedIndex() }

// buildService implements kiln.v1.BuildService.
type buildService struct{ c *Coordinator }

var _ kilnv1connect.BuildServiceHandler = buildService{}

func (s buildService) SubmitBuild(ctx context.Context, req *connect.Request[kilnv1.SubmitBuildRequest]) (*connect.Response[kilnv1.SubmitBuildResponse], error) {
	b, err := s.c.SubmitBuild(ctx, rpc.SubmitFromAPI(req.Msg))
	if err != nil {
		return nil, rpc.Error(err)
	}
	return connect.NewResponse(&kilnv1.SubmitBuildResponse{Build: rpc.BuildToAPI(b)}), nil
}

func (s buildService) GetBuild(ctx context.Context, req *connect.Request[kilnv1.GetBuildRequest]) (*connect.Response[kilnv1.GetBuildResponse], error) {
	b, err := s.c.Read().Build(req.Msg.Id)
	if err != nil {
		return nil, rpc.Error(err)
	}
	return connect.NewResponse(&kilnv1.GetBuildResponse{Build: rpc.BuildToAPI(b)}), nil
}

func (s buildService) ListBuilds(ctx context.Context, req *connect.Request[kilnv1.ListBuildsRequest]) (*connect.Response[kilnv1.ListBuildsResponse], error) {
	m := req.Msg
	f, err := raftfsm.NewBuildFilter(m.Project, m.Jobset, m.Job, m.State)
	if err != nil {
		return nil, rpc.Error(err)
	}
	page, perPage := max(m.Page, 1), m.PerPage
	if perPage == 0 {
		perPage = 50
	}
	if perPage > 1000 {
		return nil, rpc.Error(fmt.Errorf("%w: per_page at most 1000", raftfsm.ErrInvalid))
	}
	builds, total, err := s.c.Read().Builds(f, int((page-1)*perPage), int(perPage))
	if err != nil {
		return nil, rpc.Error(err)
	}
	out := &kilnv1.ListBuildsResponse{Total: uint64(total), Page: page, PerPage: perPage}
	for _, b := range builds {
		out.Builds = append(out.Builds, rpc.BuildToAPI(b))
	}
	return connect.NewResponse(out), nil
}

func (s buildService) CancelBuild(ctx context.Context, req *connect.Request[kilnv1.CancelBuildRequest]) (*connect.Response[kilnv1.CancelBuildResponse], error) {
	b, err := s.c.CancelBuild(ctx, req.Msg.Id, req.Msg.Reason)
	if err != nil {
		return nil, rpc.Error(err)
	}
	return connect.NewResponse(&kilnv1.CancelBuildResponse{Build: rpc.BuildToAPI(b)}), nil
}
