package raftfsm

import (
	"encoding/hex"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Agent registrations.

func init() {
	register(pb.CommandType_COMMAND_TYPE_REGISTER_AGENT, func() *pb.RegisterAgent { return &pb.RegisterAgent{} }, applyRegisterAgent)
	register(pb.CommandType_COMMAND_TYPE_DELETE_AGENT, func() *pb.DeleteAgent { return &pb.DeleteAgent{} }, applyDeleteAgent)
}

// ValidateAgent checks a registration the way Apply does.
func ValidateAgent(a *pb.Agent) error {
	if a == nil {
		return fmt.Errorf("%w: missing agent", ErrInvalid)
	}
	if a.Id == "" || len(a.Id) > 64 || len(a.Name) > 255 || len(a.NixVersion) > 64 {
		return fmt.Errorf("%w: agent id must be 1 to 64 bytes, name at most 255", ErrInvalid)
	}
	if b, err := hex.DecodeString(a.CredentialSha256); err != nil || len(b) != 32 {
		return fmt.Errorf("%w: agent credential hash must be a sha256 hex digest", ErrInvalid)
	}
	if len(a.Systems) == 0 {
		return fmt.Errorf("%w: an agent needs at least one system", ErrInvalid)
	}
	for _, list := range [][]string{a.Systems, a.SupportedFeatures, a.MandatoryFeatures} {
		if len(list) > 64 || !slices.IsSorted(list) || len(slices.Compact(slices.Clone(list))) != len(list) {
			return fmt.Errorf("%w: systems and features must be sorted, unique, at most 64", ErrInvalid)
		}
		for _, s := range list {
			if s == "" || len(s) > 64 {
				return fmt.Errorf("%w: system or feature names must be 1 to 64 bytes", ErrInvalid)
			}
		}
	}
	for _, m := range a.MandatoryFeatures {
		if _, ok := slices.BinarySearch(a.SupportedFeatures, m); !ok {
			return fmt.Errorf("%w: mandatory feature %q is not among the supported ones", ErrInvalid, m)
		}
	}
	if a.MaxJobs == 0 || a.MaxJobs > 1024 {
		return fmt.Errorf("%w: max jobs must be 1 to 1024", ErrInvalid)
	}
	return nil
}

func applyRegisterAgent(c *applyCtx, m *pb.RegisterAgent) (uint64, error) {
	if err := ValidateAgent(m.GetAgent()); err != nil {
		return 0, err
	}
	a := proto.Clone(m.Agent).(*pb.Agent)
	old, err := c.txn.First(tableAgents, "id", a.Id)
	if err != nil {
		return 0, err
	}
	if old != nil {
		return 0, fmt.Errorf("%w: agent %q is already registered", ErrConflict, a.Id)
	}
	a.RegisteredAt = c.now
	return 0, c.txn.Insert(tableAgents, a)
}

func applyDeleteAgent(c *applyCtx, m *pb.DeleteAgent) (uint64, error) {
	old, err := c.txn.First(tableAgents, "id", m.Id)
	if err != nil {
		return 0, err
	}
	if old == nil {
		return 0, fmt.Errorf("%w: agent %q", ErrNotFound, m.Id)
	}
	return 0, c.txn.Delete(tableAgents, old)
}

// Agent returns a registered agent or ErrNotFound.
func (r *Reader) Agent(id string) (*pb.Agent, error) {
	a, err := first[*pb.Agent](r, tableAgents, "id", id)
	if err == nil && a == nil {
		err = fmt.Errorf("%w: agent %q", ErrNotFound, trunc(id))
	}
	return a, err
}

// Agents lists registered agents.
func (r *Reader) Agents() ([]*pb.Agent, error) { return all[*pb.Agent](r.txn.Get(tableAgents, "id")) }
