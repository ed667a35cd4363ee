package raftfsm

import (
	"bytes"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Roles a user may hold (Hydra's, plus FC's self-serve ones).
var Roles = []string{"admin", "bump-to-front", "cancel-build", "create-projects", "eval-jobset", "read-only", "restart-jobs"}

func init() {
	register(pb.CommandType_COMMAND_TYPE_PUT_USER, func() *pb.PutUser { return &pb.PutUser{} }, applyPutUser)
	register(pb.CommandType_COMMAND_TYPE_DELETE_USER, func() *pb.DeleteUser { return &pb.DeleteUser{} }, applyDeleteUser)
}

// ValidateUser checks a user record without state.
func ValidateUser(u *pb.User) error {
	if u == nil {
		return fmt.Errorf("%w: missing user", ErrInvalid)
	}
	if err := ValidName("user", u.Name); err != nil {
		return err
	}
	if len(u.FullName) > 256 || len(u.Email) > 256 {
		return fmt.Errorf("%w: full name and email are at most 256 bytes", ErrInvalid)
	}
	if len(u.Roles) > len(Roles) {
		return fmt.Errorf("%w: too many roles", ErrInvalid)
	}
	for _, r := range u.Roles {
		if !slices.Contains(Roles, r) {
			return fmt.Errorf("%w: role %q: valid roles are %v", ErrInvalid, trunc(r), Roles)
		}
	}
	if !bytes.HasPrefix(u.PasswordHash, []byte("$2")) || len(u.PasswordHash) > 128 {
		return fmt.Errorf("%w: password hash is not bcrypt", ErrInvalid)
	}
	return nil
}

func applyPutUser(c *applyCtx, m *pb.PutUser) (uint64, error) {
	if err := ValidateUser(m.User); err != nil {
		return 0, err
	}
	u := proto.Clone(m.User).(*pb.User)
	slices.Sort(u.Roles)
	u.Roles = slices.Compact(u.Roles)
	u.CreatedAt = c.now
	if old, err := c.txn.First(tableUsers, "id", u.Name); err != nil {
		return 0, err
	} else if old != nil {
		u.CreatedAt = old.(*pb.User).CreatedAt
	}
	return 0, c.txn.Insert(tableUsers, u)
}

func applyDeleteUser(c *applyCtx, m *pb.DeleteUser) (uint64, error) {
	old, err := c.txn.First(tableUsers, "id", m.Name)
	if err != nil {
		return 0, err
	}
	if old == nil {
		return 0, fmt.Errorf("%w: user %q", ErrNotFound, trunc(m.Name))
	}
	return 0, c.txn.Delete(tableUsers, old)
}

// User returns one user or ErrNotFound.
func (r *Reader) User(name string) (*pb.User, error) {
	u, err := first[*pb.User](r, tableUsers, "id", name)
	if err == nil && u == nil {
		err = fmt.Errorf("%w: user %q", ErrNotFound, trunc(name))
	}
	return u, err
}

// Users lists every user by name.
func (r *Reader) Users() ([]*pb.User, error) { return all[*pb.User](r.txn.Get(tableUsers, "id")) }
