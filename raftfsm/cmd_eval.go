package raftfsm

import (
	"fmt"
	"strings"

	"github.com/hashicorp/go-memdb"
	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// MaxEvalBuilds bounds the jobs of one evaluation.
const MaxEvalBuilds = 100_000

func init() {
	register(pb.CommandType_COMMAND_TYPE_CREATE_EVAL, func() *pb.CreateEval { return &pb.CreateEval{} }, applyCreateEval)
	register(pb.CommandType_COMMAND_TYPE_CANCEL_EVAL, func() *pb.CancelEval { return &pb.CancelEval{} }, applyCancelEval)
	register(pb.CommandType_COMMAND_TYPE_TRIGGER_JOBSETS, func() *pb.TriggerJobsets { return &pb.TriggerJobsets{} }, applyTriggerJobsets)
}

// ValidateCreateEval checks an evaluation without state; Apply re-checks.
func ValidateCreateEval(m *pb.CreateEval) error {
	e := m.GetEval()
	if e == nil {
		return fmt.Errorf("%w: missing evaluation", ErrInvalid)
	}
	if err := ValidName("project", e.Project); err != nil {
		return err
	}
	if err := ValidName("jobset", e.Jobset); err != nil {
		return err
	}
	if len(m.Builds) > MaxEvalBuilds {
		return fmt.Errorf("%w: %d jobs in one evaluation (max %d)", ErrTooLarge, len(m.Builds), MaxEvalBuilds)
	}
	if e.CheckoutTime < 0 || e.EvalTime < 0 {
		return fmt.Errorf("%w: negative checkout or eval time", ErrInvalid)
	}
	jobs := make(map[string]bool, len(m.Builds))
	for _, sb := range m.Builds {
		b := sb.GetBuild()
		if b == nil {
			return fmt.Errorf("%w: missing build", ErrInvalid)
		}
		if err := ValidName("job", b.Job); err != nil {
			return err
		}
		if jobs[b.Job] {
			return fmt.Errorf("%w: job %q appears twice in the evaluation", ErrInvalid, b.Job)
		}
		jobs[b.Job] = true
		if (b.Project != "" && b.Project != e.Project) || (b.Jobset != "" && b.Jobset != e.Jobset) {
			return fmt.Errorf("%w: job %q names another jobset", ErrInvalid, b.Job)
		}
		if _, err := ValidateSubmit(sb); err != nil {
			return fmt.Errorf("job %s: %w", b.Job, err)
		}
	}
	return nil
}

// applyCreateEval records an evaluation. A job whose derivation is the one
// the jobset's previous evaluation built reuses that build (Hydra's
// jobsetevals); other jobs become new builds.
func applyCreateEval(c *applyCtx, m *pb.CreateEval) (uint64, error) {
	if err := ValidateCreateEval(m); err != nil {
		return 0, err
	}
	in := m.Eval
	j, err := c.txn.First(tableJobsets, "id", in.Project, in.Jobset)
	if err != nil {
		return 0, err
	}
	if j == nil {
		return 0, fmt.Errorf("%w: jobset %s:%s", ErrNotFound, in.Project, in.Jobset)
	}
	var id uint64 = 1
	if last, err := c.txn.Last(tableEvals, "id"); err != nil {
		return 0, err
	} else if last != nil {
		id = last.(*pb.Eval).Id + 1
	}
	prev := map[string]*pb.Build{} // job → build of the previous evaluation
	if o, err := c.txn.Last(tableEvals, "jobset", in.Project, in.Jobset); err != nil {
		return 0, err
	} else if o != nil {
		for _, bid := range o.(*pb.Eval).Builds {
			if b := readBuilds(c.txn).get(bid); b != nil {
				prev[b.Job] = b
			}
		}
	}
	e := &pb.Eval{
		Id: id, Project: in.Project, Jobset: in.Jobset, Timestamp: c.now,
		CheckoutTime: in.CheckoutTime, EvalTime: in.EvalTime, Flake: in.Flake, Inputs: in.Inputs,
		HasNewBuilds: len(prev) != len(m.Builds),
	}
	w := newWork(c)
	for _, sb := range m.Builds {
		b := sb.Build
		if old := prev[b.Job]; old != nil && old.DrvPath == b.DrvPath {
			ob, err := w.build(old.Id)
			if err != nil {
				return 0, err
			}
			ob.EvalIds = append(ob.EvalIds, id)
			e.Builds = append(e.Builds, ob.Id)
			continue
		}
		e.HasNewBuilds = true
		b.Project, b.Jobset, b.EvalId, b.EvalIds = in.Project, in.Jobset, id, []uint64{id}
		if err := w.submit(sb); err != nil {
			return 0, fmt.Errorf("job %s: %w", b.Job, err)
		}
		e.Builds = append(e.Builds, b.Id)
	}
	js := proto.Clone(j.(*pb.Jobset)).(*pb.Jobset)
	js.TriggerTime, js.LastCheckedAt = 0, c.now
	if err := c.txn.Insert(tableJobsets, js); err != nil {
		return 0, err
	}
	if err := c.txn.Insert(tableEvals, e); err != nil {
		return 0, err
	}
	return id, w.flush()
}

// applyCancelEval cancels every unfinished build of an evaluation.
func applyCancelEval(c *applyCtx, m *pb.CancelEval) (uint64, error) {
	o, err := c.txn.First(tableEvals, "id", m.Id)
	if err != nil {
		return 0, err
	}
	if o == nil {
		return 0, fmt.Errorf("%w: evaluation %d", ErrNotFound, m.Id)
	}
	e := proto.Clone(o.(*pb.Eval)).(*pb.Eval)
	reason := m.Reason
	if reason == "" {
		reason = fmt.Sprintf("evaluation %d cancelled", m.Id)
	}
	w := newWork(c)
	n := 0
	for _, bid := range e.Builds {
		b, err := w.build(bid)
		if err != nil {
			return 0, err
		}
		if b.State != pb.BuildState_BUILD_STATE_QUEUED {
			continue
		}
		if err := w.finishBuild(b, 4, reason); err != nil {
			return 0, err
		}
		n++
	}
	if n == 0 {
		return 0, fmt.Errorf("%w: evaluation %d has no unfinished builds", ErrConflict, m.Id)
	}
	e.Cancelled = true
	if err := c.txn.Insert(tableEvals, e); err != nil {
		return 0, err
	}
	return e.Id, w.flush()
}

// ParseJobsetRef splits Hydra's "project:jobset".
func ParseJobsetRef(s string) (project, jobset string, err error) {
	p, j, ok := strings.Cut(s, ":")
	if !ok {
		return "", "", fmt.Errorf("%w: %q is not project:jobset", ErrInvalid, trunc(s))
	}
	if err := ValidName("project", p); err != nil {
		return "", "", err
	}
	if err := ValidName("jobset", j); err != nil {
		return "", "", err
	}
	return p, j, nil
}

// applyTriggerJobsets records a push trigger on each jobset; an unknown
// jobset refuses the whole command.
func applyTriggerJobsets(c *applyCtx, m *pb.TriggerJobsets) (uint64, error) {
	if len(m.Jobsets) == 0 || len(m.Jobsets) > 1000 {
		return 0, fmt.Errorf("%w: name 1 to 1000 jobsets", ErrInvalid)
	}
	var out []*pb.Jobset
	for _, ref := range m.Jobsets {
		p, j, err := ParseJobsetRef(ref)
		if err != nil {
			return 0, err
		}
		o, err := c.txn.First(tableJobsets, "id", p, j)
		if err != nil {
			return 0, err
		}
		if o == nil {
			return 0, fmt.Errorf("%w: jobset %s", ErrNotFound, ref)
		}
		js := proto.Clone(o.(*pb.Jobset)).(*pb.Jobset)
		js.TriggerTime = c.now
		out = append(out, js)
	}
	for _, js := range out {
		if err := c.txn.Insert(tableJobsets, js); err != nil {
			return 0, err
		}
	}
	return uint64(len(out)), nil
}

// Eval returns one evaluation or ErrNotFound.
func (r *Reader) Eval(id uint64) (*pb.Eval, error) {
	e, err := first[*pb.Eval](r, tableEvals, "id", id)
	if err == nil && e == nil {
		err = fmt.Errorf("%w: evaluation %d", ErrNotFound, id)
	}
	return e, err
}

// EvalFilter selects evaluations; empty fields match everything.
type EvalFilter struct{ Project, Jobset string }

// Evals lists matching evaluations, newest first: the page
// [offset, offset+limit) and the total number that match.
func (r *Reader) Evals(f EvalFilter, offset, limit int) ([]*pb.Eval, int, error) {
	var it memdb.ResultIterator
	var err error
	switch {
	case f.Project != "" && f.Jobset != "":
		it, err = r.txn.GetReverse(tableEvals, "jobset", f.Project, f.Jobset)
	default:
		it, err = r.txn.GetReverse(tableEvals, "id")
	}
	if err != nil {
		return nil, 0, err
	}
	var page []*pb.Eval
	total := 0
	for o := it.Next(); o != nil; o = it.Next() {
		e := o.(*pb.Eval)
		if f.Project != "" && e.Project != f.Project {
			continue
		}
		if total >= offset && len(page) < limit {
			page = append(page, e)
		}
		total++
	}
	return page, total, nil
}

// LatestEval is a jobset's newest evaluation, or ErrNotFound.
func (r *Reader) LatestEval(project, jobset string) (*pb.Eval, error) {
	o, err := r.txn.Last(tableEvals, "jobset", project, jobset)
	if err != nil {
		return nil, err
	}
	if o == nil {
		return nil, fmt.Errorf("%w: jobset %s:%s has no evaluation", ErrNotFound, project, jobset)
	}
	return o.(*pb.Eval), nil
}
