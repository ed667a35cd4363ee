package raftfsm

import (
	"encoding/hex"
	"fmt"
	"slices"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Binary-cache records: narinfo, build logs, pins, and the garbage collector
// that drops what no root reaches.

func init() {
	register(pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, func() *pb.PutNarInfo { return &pb.PutNarInfo{} }, applyPutNarInfo)
	register(pb.CommandType_COMMAND_TYPE_PUT_LOG, func() *pb.PutLog { return &pb.PutLog{} }, applyPutLog)
	register(pb.CommandType_COMMAND_TYPE_PIN_PATH, func() *pb.PinPath { return &pb.PinPath{} }, applyPinPath)
	register(pb.CommandType_COMMAND_TYPE_UNPIN_PATH, func() *pb.UnpinPath { return &pb.UnpinPath{} }, applyUnpinPath)
	register(pb.CommandType_COMMAND_TYPE_COLLECT_GARBAGE, func() *pb.CollectGarbage { return &pb.CollectGarbage{} }, applyCollectGarbage)
}

// HashPart is the 32-character hash of a store path or basename.
func HashPart(pathOrBase string) string {
	base := strings.TrimPrefix(pathOrBase, StoreDir+"/")
	if len(base) < 32 {
		return base
	}
	return base[:32]
}

// ValidNixHash checks "sha256:<52 nix-base32 chars>" and returns the digest.
func ValidNixHash(what, h string) ([]byte, error) {
	rest, ok := strings.CutPrefix(h, "sha256:")
	if !ok || len(rest) != 52 {
		return nil, fmt.Errorf("%w: %s %q: want sha256:<52 nix-base32 characters>", ErrInvalid, what, trunc(h))
	}
	d, err := nixbase32.DecodeString(rest)
	if err != nil {
		return nil, fmt.Errorf("%w: %s %q: %v", ErrInvalid, what, trunc(h), err)
	}
	return d, nil
}

// NarURL is where a NAR compressed with zstd whose file has digest d lives.
func NarURL(fileDigest []byte) string {
	return "nar/" + nixbase32.EncodeToString(fileDigest) + ".nar.zst"
}

// ValidateNarInfo checks a narinfo record the way Apply does.
func ValidateNarInfo(n *pb.NarInfo) error {
	if n == nil {
		return fmt.Errorf("%w: missing narinfo", ErrInvalid)
	}
	if err := ValidStorePath(n.StorePath); err != nil {
		return err
	}
	if n.Compression != "zstd" {
		return fmt.Errorf("%w: compression %q: this cache stores zstd (push with ?compression=zstd)", ErrInvalid, trunc(n.Compression))
	}
	fd, err := ValidNixHash("FileHash", n.FileHash)
	if err != nil {
		return err
	}
	if _, err := ValidNixHash("NarHash", n.NarHash); err != nil {
		return err
	}
	if n.Url != NarURL(fd) {
		return fmt.Errorf("%w: URL %q does not match FileHash (want %s)", ErrInvalid, trunc(n.Url), NarURL(fd))
	}
	if n.Blob != hex.EncodeToString(fd) {
		return fmt.Errorf("%w: blob %q does not match FileHash", ErrInvalid, trunc(n.Blob))
	}
	if n.FileSize == 0 || n.NarSize == 0 {
		return fmt.Errorf("%w: FileSize and NarSize must be positive", ErrInvalid)
	}
	for _, r := range n.References {
		if err := ValidStorePath(StoreDir + "/" + r); err != nil {
			return fmt.Errorf("reference: %w", err)
		}
	}
	if !slices.IsSorted(n.References) {
		return fmt.Errorf("%w: references must be sorted", ErrInvalid)
	}
	if n.Deriver != "" {
		if err := ValidDrvPath(StoreDir + "/" + n.Deriver); err != nil {
			return fmt.Errorf("deriver: %w", err)
		}
	}
	if len(n.Sigs) > 16 || len(n.Ca) > 1024 || len(n.System) > 64 {
		return fmt.Errorf("%w: too many signatures or an overlong CA or system", ErrInvalid)
	}
	return nil
}

func applyPutNarInfo(c *applyCtx, m *pb.PutNarInfo) (uint64, error) {
	n := m.GetNarInfo()
	if err := ValidateNarInfo(n); err != nil {
		return 0, err
	}
	if m.LeaseId != 0 {
		o := readSteps(c.txn).leased(m.LeaseId)
		if o == nil || o.State != pb.StepState_STEP_STATE_LEASED {
			return 0, fmt.Errorf("%w: lease %d is not current", ErrStaleLease, m.LeaseId)
		}
		if !slices.ContainsFunc(o.Outputs, func(out outputRec) bool { return out.Path == n.StorePath }) {
			return 0, fmt.Errorf("%w: %s is not an output of the leased derivation", ErrInvalid, n.StorePath)
		}
	}
	old, err := c.txn.First(tableNarInfos, "id", HashPart(n.StorePath))
	if err != nil {
		return 0, err
	}
	if old != nil {
		if o := old.(*pb.NarInfo); o.StorePath != n.StorePath {
			return 0, fmt.Errorf("%w: hash of %s already used by %s", ErrConflict, n.StorePath, o.StorePath)
		}
		return 0, nil // the first record stays, as in a Nix binary cache
	}
	n = proto.Clone(n).(*pb.NarInfo)
	n.CreatedAt = c.now
	return 0, c.txn.Insert(tableNarInfos, n)
}

func applyPutLog(c *applyCtx, m *pb.PutLog) (uint64, error) {
	l := m.GetLog()
	if l == nil {
		return 0, fmt.Errorf("%w: missing log", ErrInvalid)
	}
	if err := ValidDrvPath(l.DrvPath); err != nil {
		return 0, err
	}
	if len(l.Blob) != 64 {
		return 0, fmt.Errorf("%w: log blob must be a sha256 hex digest", ErrInvalid)
	}
	if _, err := hex.DecodeString(l.Blob); err != nil {
		return 0, fmt.Errorf("%w: log blob must be a sha256 hex digest", ErrInvalid)
	}
	l = proto.Clone(l).(*pb.LogRecord)
	l.CreatedAt = c.now
	return 0, c.txn.Insert(tableLogs, l) // a newer log of the same derivation replaces the old
}

func applyPinPath(c *applyCtx, m *pb.PinPath) (uint64, error) {
	p := m.GetPin()
	if p == nil {
		return 0, fmt.Errorf("%w: missing pin", ErrInvalid)
	}
	if err := ValidStorePath(p.StorePath); err != nil {
		return 0, err
	}
	if len(p.Reason) > 1024 {
		return 0, fmt.Errorf("%w: pin reason longer than 1024 bytes", ErrInvalid)
	}
	p = proto.Clone(p).(*pb.Pin)
	p.CreatedAt = c.now
	return 0, c.txn.Insert(tablePins, p)
}

func applyUnpinPath(c *applyCtx, m *pb.UnpinPath) (uint64, error) {
	old, err := c.txn.First(tablePins, "id", m.StorePath)
	if err != nil {
		return 0, err
	}
	if old == nil {
		return 0, fmt.Errorf("%w: no pin on %q", ErrNotFound, trunc(m.StorePath))
	}
	return 0, c.txn.Delete(tablePins, old)
}

// applyCollectGarbage marks from the roots through narinfo references and
// deletes unmarked narinfo and log records older than the grace period.
// It runs inside Apply, so every replica deletes exactly the same records
// and no root can appear between the decision and the deletion.
func applyCollectGarbage(c *applyCtx, m *pb.CollectGarbage) (uint64, error) {
	if m.GraceSeconds < 0 || m.MaxDeletes == 0 {
		return 0, fmt.Errorf("%w: grace must be >= 0 and max_deletes > 0", ErrInvalid)
	}
	cutoff := c.now - m.GraceSeconds
	roots, keepDrvs, err := gcRoots(c, cutoff)
	if err != nil {
		return 0, err
	}
	// Mark: everything reachable from a root through references.
	marked := map[string]bool{}
	queue := make([]string, 0, len(roots))
	for h := range roots {
		queue = append(queue, h)
	}
	slices.Sort(queue)
	for len(queue) > 0 {
		h := queue[len(queue)-1]
		queue = queue[:len(queue)-1]
		if marked[h] {
			continue
		}
		marked[h] = true
		o, err := c.txn.First(tableNarInfos, "id", h)
		if err != nil {
			return 0, err
		}
		if o == nil {
			continue
		}
		ni := o.(*pb.NarInfo)
		if ni.Deriver != "" {
			keepDrvs[StoreDir+"/"+ni.Deriver] = true
		}
		for _, r := range ni.References {
			if rh := HashPart(r); !marked[rh] {
				queue = append(queue, rh)
			}
		}
	}
	// Sweep, in key order, at most MaxDeletes records.
	var doomed []any
	it, err := c.txn.Get(tableNarInfos, "id")
	if err != nil {
		return 0, err
	}
	for o := it.Next(); o != nil && len(doomed) < int(m.MaxDeletes); o = it.Next() {
		if !marked[HashPart(o.(*pb.NarInfo).StorePath)] {
			doomed = append(doomed, o)
		}
	}
	nNar := len(doomed)
	it, err = c.txn.Get(tableLogs, "id")
	if err != nil {
		return 0, err
	}
	for o := it.Next(); o != nil && len(doomed) < int(m.MaxDeletes); o = it.Next() {
		l := o.(*pb.LogRecord)
		if l.CreatedAt <= cutoff && !keepDrvs[l.DrvPath] {
			doomed = append(doomed, o)
		}
	}
	for i, o := range doomed {
		table := tableNarInfos
		if i >= nNar {
			table = tableLogs
		}
		if err := c.txn.Delete(table, o); err != nil {
			return 0, err
		}
	}
	return uint64(len(doomed)), nil
}

// gcRoots returns the hash parts of root paths, and the derivations whose
// logs are kept.
func gcRoots(c *applyCtx, cutoff int64) (map[string]bool, map[string]bool, error) {
	roots := map[string]bool{}
	keepDrvs := map[string]bool{}
	addOutputs := func(drv string, outs []*pb.Output) {
		keepDrvs[drv] = true
		for _, o := range outs {
			roots[HashPart(o.Path)] = true
		}
	}
	// Pinned paths.
	it, err := c.txn.Get(tablePins, "id")
	if err != nil {
		return nil, nil, err
	}
	for o := it.Next(); o != nil; o = it.Next() {
		roots[HashPart(o.(*pb.Pin).StorePath)] = true
	}
	// Young records: they may be mid-push, and what they reference stays.
	it, err = c.txn.Get(tableNarInfos, "id")
	if err != nil {
		return nil, nil, err
	}
	for o := it.Next(); o != nil; o = it.Next() {
		if n := o.(*pb.NarInfo); n.CreatedAt > cutoff {
			roots[HashPart(n.StorePath)] = true
		}
	}
	// Steps some unfinished build needs, and unfinished builds.
	readSteps(c.txn).each(func(s *stepRec) bool {
		if s.Refs > 0 {
			keepDrvs[s.DrvPath] = true
			for _, o := range s.Outputs {
				roots[HashPart(o.Path)] = true
			}
		}
		return true
	})
	readBuilds(c.txn).inState(pb.BuildState_BUILD_STATE_QUEUED, func(b *pb.Build) bool {
		addOutputs(b.DrvPath, b.Outputs)
		return true
	})
	// Builds of the latest keep_nr evaluations of each jobset.
	it, err = c.txn.Get(tableJobsets, "id")
	if err != nil {
		return nil, nil, err
	}
	for o := it.Next(); o != nil; o = it.Next() {
		j := o.(*pb.Jobset)
		if j.KeepNr <= 0 {
			continue
		}
		evals, err := c.txn.Get(tableEvals, "jobset", j.Project, j.Name)
		if err != nil {
			return nil, nil, err
		}
		var ids []uint64
		byID := map[uint64]*pb.Eval{}
		for e := evals.Next(); e != nil; e = evals.Next() {
			ev := e.(*pb.Eval)
			ids = append(ids, ev.Id)
			byID[ev.Id] = ev
		}
		slices.Sort(ids)
		if len(ids) > int(j.KeepNr) {
			ids = ids[len(ids)-int(j.KeepNr):]
		}
		for _, id := range ids {
			for _, bid := range byID[id].Builds {
				if b := readBuilds(c.txn).get(bid); b != nil {
					addOutputs(b.DrvPath, b.Outputs)
				}
			}
		}
	}
	return roots, keepDrvs, nil
}
