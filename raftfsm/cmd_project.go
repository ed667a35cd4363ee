package raftfsm

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

func init() {
	register(pb.CommandType_COMMAND_TYPE_PUT_PROJECT, func() *pb.PutProject { return &pb.PutProject{} }, applyPutProject)
	register(pb.CommandType_COMMAND_TYPE_DELETE_PROJECT, func() *pb.DeleteProject { return &pb.DeleteProject{} }, applyDeleteProject)
	register(pb.CommandType_COMMAND_TYPE_PUT_JOBSET, func() *pb.PutJobset { return &pb.PutJobset{} }, applyPutJobset)
	register(pb.CommandType_COMMAND_TYPE_DELETE_JOBSET, func() *pb.DeleteJobset { return &pb.DeleteJobset{} }, applyDeleteJobset)
}

func applyPutProject(c *applyCtx, m *pb.PutProject) (uint64, error) {
	p := m.GetProject()
	if p == nil {
		return 0, fmt.Errorf("%w: missing project", ErrInvalid)
	}
	if err := ValidName("project", p.Name); err != nil {
		return 0, err
	}
	p = proto.Clone(p).(*pb.Project)
	old, err := c.txn.First(tableProjects, "id", p.Name)
	if err != nil {
		return 0, err
	}
	p.CreatedAt = c.now
	if old != nil {
		p.CreatedAt = old.(*pb.Project).CreatedAt
	}
	return 0, c.txn.Insert(tableProjects, p)
}

func applyDeleteProject(c *applyCtx, m *pb.DeleteProject) (uint64, error) {
	old, err := c.txn.First(tableProjects, "id", m.Name)
	if err != nil {
		return 0, err
	}
	if old == nil {
		return 0, fmt.Errorf("%w: project %q", ErrNotFound, m.Name)
	}
	if _, err := c.txn.DeleteAll(tableJobsets, "id_prefix", m.Name); err != nil {
		return 0, err
	}
	return 0, c.txn.Delete(tableProjects, old)
}

func applyPutJobset(c *applyCtx, m *pb.PutJobset) (uint64, error) {
	j := m.GetJobset()
	if j == nil {
		return 0, fmt.Errorf("%w: missing jobset", ErrInvalid)
	}
	if err := ValidName("jobset", j.Name); err != nil {
		return 0, err
	}
	if p, err := c.txn.First(tableProjects, "id", j.Project); err != nil {
		return 0, err
	} else if p == nil {
		return 0, fmt.Errorf("%w: project %q", ErrNotFound, j.Project)
	}
	if j.Enabled < 0 || j.Enabled > 3 {
		return 0, fmt.Errorf("%w: jobset enabled must be 0 to 3", ErrInvalid)
	}
	j = proto.Clone(j).(*pb.Jobset)
	old, err := c.txn.First(tableJobsets, "id", j.Project, j.Name)
	if err != nil {
		return 0, err
	}
	j.CreatedAt = c.now
	if old != nil {
		j.CreatedAt = old.(*pb.Jobset).CreatedAt
	}
	return 0, c.txn.Insert(tableJobsets, j)
}

func applyDeleteJobset(c *applyCtx, m *pb.DeleteJobset) (uint64, error) {
	old, err := c.txn.First(tableJobsets, "id", m.Project, m.Name)
	if err != nil {
		return 0, err
	}
	if old == nil {
		return 0, fmt.Errorf("%w: jobset %s:%s", ErrNotFound, m.Project, m.Name)
	}
	return 0, c.txn.Delete(tableJobsets, old)
}
