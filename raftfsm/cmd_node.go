package raftfsm

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

func init() {
	register(pb.CommandType_COMMAND_TYPE_PUT_NODE, func() *pb.PutNode { return &pb.PutNode{} }, applyPutNode)
	register(pb.CommandType_COMMAND_TYPE_DELETE_NODE, func() *pb.DeleteNode { return &pb.DeleteNode{} }, applyDeleteNode)
}

func applyPutNode(c *applyCtx, m *pb.PutNode) (uint64, error) {
	n := m.GetNode()
	if n == nil || n.Id == "" || !n.Removed && (n.RaftAddr == "" || n.HttpAddr == "") {
		return 0, fmt.Errorf("%w: a node needs an id, a Raft address and an HTTP address", ErrInvalid)
	}
	return 0, c.txn.Insert(tableNodes, proto.Clone(n))
}

func applyDeleteNode(c *applyCtx, m *pb.DeleteNode) (uint64, error) {
	old, err := c.txn.First(tableNodes, "id", m.Id)
	if err != nil {
		return 0, err
	}
	if old == nil {
		return 0, fmt.Errorf("%w: node %q", ErrNotFound, m.Id)
	}
	return 0, c.txn.Delete(tableNodes, old)
}
