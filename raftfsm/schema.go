package raftfsm

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/hashicorp/go-memdb"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Table names.
const (
	tableProjects   = "projects"
	tableJobsets    = "jobsets"
	tableEvals      = "evals"
	tableBuilds     = "builds" // names build records in snapshots and errors
	tableBuildTable = "buildtable"
	tableSteps      = "steps" // names step records in snapshots and errors
	tableStepTable  = "steptable"
	tableLeases     = "leases"
	tableNodes      = "nodes"
	tableNarInfos   = "narinfos"
	tableLogs       = "logs"
	tablePins       = "pins"
	tableAgents     = "agents"
	tableUsers      = "users"
)

// keyFunc builds an index key from an object; argsFunc from query arguments.
type keyFunc func(obj any) ([]byte, bool, error)
type argsFunc func(args ...any) ([]byte, error)

// funcIndex is a memdb index defined by two functions. Keys are
// self-delimiting so prefix queries on leading components work.
type funcIndex struct {
	obj  keyFunc
	args argsFunc
}

func (f funcIndex) FromObject(obj any) (bool, []byte, error) {
	k, ok, err := f.obj(obj)
	return ok, k, err
}
func (f funcIndex) FromArgs(args ...any) ([]byte, error) { return f.args(args...) }

// PrefixFromArgs allows prefix iteration ("_prefix" index suffix) with fewer
// components than the full key.
func (f funcIndex) PrefixFromArgs(args ...any) ([]byte, error) { return f.args(args...) }

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// strKey joins components, each terminated by NUL.
func strKey(parts ...string) []byte {
	n := 0
	for _, p := range parts {
		n += len(p) + 1
	}
	b := make([]byte, 0, n)
	for _, p := range parts {
		b = append(b, p...)
		b = append(b, 0)
	}
	return b
}

func argStrings(args []any) ([]string, error) {
	out := make([]string, len(args))
	for i, a := range args {
		s, ok := a.(string)
		if !ok {
			return nil, fmt.Errorf("index argument %d: want string, got %T", i, a)
		}
		out[i] = s
	}
	return out, nil
}

func stringsArgs(args ...any) ([]byte, error) {
	s, err := argStrings(args)
	if err != nil {
		return nil, err
	}
	return strKey(s...), nil
}

func uintArgs(args ...any) ([]byte, error) {
	if len(args) != 1 {
		return nil, fmt.Errorf("want one id argument, got %d", len(args))
	}
	v, ok := args[0].(uint64)
	if !ok {
		return nil, fmt.Errorf("id argument: want uint64, got %T", args[0])
	}
	return u64(v), nil
}

// logArgs takes (drv [, attempt]); the drv alone is a prefix of its attempts.
func logArgs(args ...any) ([]byte, error) {
	if len(args) == 0 || len(args) > 2 {
		return nil, fmt.Errorf("want a drv path and an optional attempt")
	}
	drv, ok := args[0].(string)
	if !ok {
		return nil, fmt.Errorf("drv argument: want string, got %T", args[0])
	}
	k := strKey(drv)
	if len(args) == 2 {
		a, ok := args[1].(uint32)
		if !ok {
			return nil, fmt.Errorf("attempt argument: want uint32, got %T", args[1])
		}
		k = binary.BigEndian.AppendUint32(k, a)
	}
	return k, nil
}

func buildStateArgs(args ...any) ([]byte, error) {
	if len(args) != 1 {
		return nil, fmt.Errorf("want one state argument")
	}
	st, ok := args[0].(pb.BuildState)
	if !ok {
		return nil, fmt.Errorf("state argument: want BuildState, got %T", args[0])
	}
	return []byte{byte(st)}, nil
}

// FeaturesKey is the canonical form of a feature set used in indexes.
func FeaturesKey(features []string) string { return strings.Join(features, ",") }

func schema() *memdb.DBSchema {
	idx := func(name string, unique bool, obj keyFunc, args argsFunc) *memdb.IndexSchema {
		return &memdb.IndexSchema{Name: name, Unique: unique, Indexer: funcIndex{obj, args}}
	}
	return &memdb.DBSchema{Tables: map[string]*memdb.TableSchema{
		tableProjects: {Name: tableProjects, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return strKey(o.(*pb.Project).Name), true, nil
			}, stringsArgs),
		}},
		tableJobsets: {Name: tableJobsets, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				j := o.(*pb.Jobset)
				return strKey(j.Project, j.Name), true, nil
			}, stringsArgs),
		}},
		tableEvals: {Name: tableEvals, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return u64(o.(*pb.Eval).Id), true, nil
			}, uintArgs),
			"jobset": idx("jobset", false, func(o any) ([]byte, bool, error) {
				e := o.(*pb.Eval)
				return strKey(e.Project, e.Jobset), true, nil
			}, stringsArgs),
		}},
		// Builds live in B-trees held by this table's one row (builds.go).
		tableBuildTable: {Name: tableBuildTable, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(any) ([]byte, bool, error) { return []byte{0}, true, nil },
				func(...any) ([]byte, error) { return []byte{0}, nil }),
		}},
		// Steps live in B-trees held by this table's one row (steps.go).
		tableStepTable: {Name: tableStepTable, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(any) ([]byte, bool, error) { return []byte{0}, true, nil },
				func(...any) ([]byte, error) { return []byte{0}, nil }),
		}},
		tableLeases: {Name: tableLeases, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return u64(o.(*pb.Lease).Id), true, nil
			}, uintArgs),
			// No index by agent: nothing asks for one, and every grant
			// and hand-back would pay for it on every replica.
		}},
		tableNarInfos: {Name: tableNarInfos, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return strKey(HashPart(o.(*pb.NarInfo).StorePath)), true, nil
			}, stringsArgs),
			"blob": idx("blob", false, func(o any) ([]byte, bool, error) {
				return strKey(o.(*pb.NarInfo).Blob), true, nil
			}, stringsArgs),
		}},
		tableLogs: {Name: tableLogs, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				l := o.(*pb.LogRecord)
				return binary.BigEndian.AppendUint32(strKey(l.DrvPath), l.Attempt), true, nil
			}, logArgs),
			"blob": idx("blob", false, func(o any) ([]byte, bool, error) {
				return strKey(o.(*pb.LogRecord).Blob), true, nil
			}, stringsArgs),
		}},
		tableAgents: {Name: tableAgents, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return strKey(o.(*pb.Agent).Id), true, nil
			}, stringsArgs),
		}},
		tableUsers: {Name: tableUsers, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return strKey(o.(*pb.User).Name), true, nil
			}, stringsArgs),
		}},
		tablePins: {Name: tablePins, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return strKey(o.(*pb.Pin).StorePath), true, nil
			}, stringsArgs),
		}},
		tableNodes: {Name: tableNodes, Indexes: map[string]*memdb.IndexSchema{
			"id": idx("id", true, func(o any) ([]byte, bool, error) {
				return strKey(o.(*pb.Node).Id), true, nil
			}, stringsArgs),
		}},
	}}
}
