package raftfsm

import (
	"fmt"
	"slices"
	"strings"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Limits on one submission.
const (
	MaxGraphNodes   = 1 << 20
	maxSystemLen    = 64
	maxFeatures     = 32
	maxOutputs      = 64
	maxInputsOfNode = 4096
)

func init() {
	register(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, func() *pb.SubmitBuild { return &pb.SubmitBuild{} }, applySubmitBuild)
	register(pb.CommandType_COMMAND_TYPE_CANCEL_BUILD, func() *pb.CancelBuild { return &pb.CancelBuild{} }, applyCancelBuild)
	register(pb.CommandType_COMMAND_TYPE_RESTART_BUILD, func() *pb.RestartBuild { return &pb.RestartBuild{} }, applyRestartBuild)
	register(pb.CommandType_COMMAND_TYPE_SET_BUILD_PRIORITY, func() *pb.SetBuildPriority { return &pb.SetBuildPriority{} }, applySetBuildPriority)
}

// ValidateSubmit checks a submission without state: well-formed paths and
// names, no duplicate nodes. Apply re-checks it; the API calls it first so
// bad input is refused before it reaches the log.
func ValidateSubmit(m *pb.SubmitBuild) (map[string]*pb.DerivationNode, error) {
	b := m.GetBuild()
	if b == nil {
		return nil, fmt.Errorf("%w: missing build", ErrInvalid)
	}
	if err := ValidDrvPath(b.DrvPath); err != nil {
		return nil, err
	}
	for _, n := range []struct{ kind, v string }{{"project", b.Project}, {"jobset", b.Jobset}, {"job", b.Job}} {
		if n.v != "" {
			if err := ValidName(n.kind, n.v); err != nil {
				return nil, err
			}
		}
	}
	if len(m.Graph) > MaxGraphNodes {
		return nil, fmt.Errorf("%w: graph of %d derivations (max %d)", ErrTooLarge, len(m.Graph), MaxGraphNodes)
	}
	graph := make(map[string]*pb.DerivationNode, len(m.Graph))
	for _, n := range m.Graph {
		if err := validNode(n); err != nil {
			return nil, err
		}
		if _, dup := graph[n.DrvPath]; dup {
			return nil, fmt.Errorf("%w: derivation %s appears twice in the graph", ErrInvalid, n.DrvPath)
		}
		graph[n.DrvPath] = n
	}
	return graph, nil
}

func validNode(n *pb.DerivationNode) error {
	if err := ValidDrvPath(n.DrvPath); err != nil {
		return err
	}
	if n.System == "" || len(n.System) > maxSystemLen || strings.ContainsAny(n.System, " ,\x00") {
		return fmt.Errorf("%w: derivation %s: system %q", ErrInvalid, n.DrvPath, trunc(n.System))
	}
	if len(n.Outputs) == 0 || len(n.Outputs) > maxOutputs {
		return fmt.Errorf("%w: derivation %s: %d outputs (want 1 to %d)", ErrInvalid, n.DrvPath, len(n.Outputs), maxOutputs)
	}
	for _, o := range n.Outputs {
		if err := ValidName("output", o.Name); err != nil {
			return fmt.Errorf("derivation %s: %w", n.DrvPath, err)
		}
		if err := ValidStorePath(o.Path); err != nil {
			return fmt.Errorf("derivation %s output %s: %w", n.DrvPath, o.Name, err)
		}
	}
	if len(n.InputDrvs) > maxInputsOfNode {
		return fmt.Errorf("%w: derivation %s: %d inputs", ErrTooLarge, n.DrvPath, len(n.InputDrvs))
	}
	for _, in := range n.InputDrvs {
		if err := ValidDrvPath(in); err != nil {
			return fmt.Errorf("derivation %s input: %w", n.DrvPath, err)
		}
	}
	if len(n.RequiredFeatures) > maxFeatures {
		return fmt.Errorf("%w: derivation %s: %d required features", ErrInvalid, n.DrvPath, len(n.RequiredFeatures))
	}
	for _, f := range n.RequiredFeatures {
		if f == "" || len(f) > 64 || strings.ContainsAny(f, " ,\x00") {
			return fmt.Errorf("%w: derivation %s: feature %q", ErrInvalid, n.DrvPath, trunc(f))
		}
	}
	return nil
}

func applySubmitBuild(c *applyCtx, m *pb.SubmitBuild) (uint64, error) {
	w := newWork(c)
	if err := w.submit(m); err != nil {
		return 0, err
	}
	if err := w.flush(); err != nil {
		return 0, err
	}
	return m.Build.Id, nil
}

// submit adds one stamped submission to the working set.
func (w *work) submit(m *pb.SubmitBuild) error {
	graph, err := ValidateSubmit(m)
	if err != nil {
		return err
	}
	b := m.Build
	if b.Id == 0 {
		return fmt.Errorf("%w: build id not stamped", ErrInvalid)
	}
	if _, ok := w.builds[b.Id]; ok {
		return fmt.Errorf("%w: build %d exists", ErrConflict, b.Id)
	}
	if readBuilds(w.c.txn).get(b.Id) != nil {
		return fmt.Errorf("%w: build %d exists", ErrConflict, b.Id)
	}
	if len(b.NixName) == 0 {
		b.NixName = NixName(b.DrvPath)
	}
	b.CreatedAt = w.c.now
	b.StateHistory = nil
	b.Restarts = 0
	return w.queue(b, graph, "queued")
}

// queue (re)queues build b: it claims every unbuilt step of its closure,
// creating unknown ones from graph and giving failed or cancelled ones a
// fresh attempt. A build whose derivation is already built finishes at once.
func (w *work) queue(b *pb.Build, graph map[string]*pb.DerivationNode, why string) error {
	c := w.c
	order, err := w.closure(b.DrvPath, graph)
	if err != nil {
		return err
	}
	// Inputs come before dependents in order.
	for _, drv := range order {
		s, err := w.step(drv)
		if err != nil {
			return err
		}
		switch {
		case s == nil:
			n := graph[drv]
			feats := slices.Clone(n.RequiredFeatures)
			slices.Sort(feats)
			s = &pb.Step{
				DrvPath: drv, Outputs: n.Outputs, InputDrvs: n.InputDrvs, System: n.System,
				RequiredFeatures: slices.Compact(feats), CreatedAt: c.now,
			}
			if b.Project != "" {
				s.Jobset = b.Project + ":" + b.Jobset
			}
			w.steps[drv] = s
			for i, in := range n.InputDrvs {
				is, err := w.mustStep(in)
				if err != nil {
					return err
				}
				n.InputDrvs[i] = is.DrvPath // one copy of each path: the step's own
				// A built input never changes state again: no need to
				// remember who waits on it.
				if is.State != pb.StepState_STEP_STATE_SUCCEEDED && !slices.Contains(is.Dependents, drv) {
					is.Dependents = append(is.Dependents, drv)
				}
			}
			w.setPending(s)
		case s.State == pb.StepState_STEP_STATE_FAILED || s.State == pb.StepState_STEP_STATE_CANCELLED:
			// A new build asks for it again: a fresh attempt.
			s.Tries, s.LastError, s.BuildStatus, s.FinishedAt, s.NotBefore = 0, "", 0, 0, 0
			w.setPending(s)
		}
		s.Refs++
		s.Priority = max(s.Priority, b.Priority)
		s.GlobalPriority = max(s.GlobalPriority, b.GlobalPriority)
	}
	root, err := w.mustStep(b.DrvPath)
	if err != nil {
		return err
	}
	b.System = root.System
	b.State = pb.BuildState_BUILD_STATE_QUEUED
	b.BuildStatus, b.StartTime, b.StopTime, b.Outputs, b.Reason = 0, 0, 0, nil, ""
	b.StateHistory = append(b.StateHistory, &pb.StateChange{At: c.now, State: why})
	w.builds[b.Id] = b
	if root.State == pb.StepState_STEP_STATE_SUCCEEDED {
		b.Outputs = root.Outputs
		b.State = pb.BuildState_BUILD_STATE_FINISHED
		b.StartTime, b.StopTime = c.now, c.now
		b.StateHistory = append(b.StateHistory, &pb.StateChange{At: c.now, State: "succeeded", Reason: "already built"})
	}
	return nil
}

// setPending counts a (new or reset) step's unbuilt inputs and sets its state.
func (w *work) setPending(s *pb.Step) {
	s.PendingInputs = 0
	for _, in := range s.InputDrvs {
		if is, _ := w.step(in); is == nil || is.State != pb.StepState_STEP_STATE_SUCCEEDED {
			s.PendingInputs++
		}
	}
	s.State = pb.StepState_STEP_STATE_RUNNABLE
	if s.PendingInputs > 0 {
		s.State = pb.StepState_STEP_STATE_WAITING
	}
}

// closure returns the unbuilt derivations root needs, inputs first. Known
// steps come from state, unknown ones must be in graph. Succeeded steps end
// the walk. A cycle is an error.
func (w *work) closure(root string, graph map[string]*pb.DerivationNode) ([]string, error) {
	const (
		onStack = 1
		done    = 2
	)
	mark := map[string]int{}
	var order []string
	type frame struct {
		drv    string
		inputs []string
		next   int
	}
	inputsOf := func(drv, from string) ([]string, bool, error) {
		s, err := w.step(drv)
		if err != nil {
			return nil, false, err
		}
		if s != nil {
			return s.InputDrvs, s.State != pb.StepState_STEP_STATE_SUCCEEDED, nil
		}
		n, ok := graph[drv]
		if !ok {
			if from == "" {
				return nil, false, fmt.Errorf("%w: derivation %s is not in the graph", ErrInvalid, drv)
			}
			return nil, false, fmt.Errorf("%w: input %s of %s is neither in the graph nor known", ErrInvalid, drv, from)
		}
		return n.InputDrvs, true, nil
	}
	ins, need, err := inputsOf(root, "")
	if err != nil || !need {
		return nil, err
	}
	stack := []*frame{{drv: root, inputs: ins}}
	mark[root] = onStack
	for len(stack) > 0 {
		f := stack[len(stack)-1]
		if f.next == len(f.inputs) {
			mark[f.drv] = done
			order = append(order, f.drv)
			stack = stack[:len(stack)-1]
			continue
		}
		in := f.inputs[f.next]
		f.next++
		switch mark[in] {
		case onStack:
			return nil, fmt.Errorf("%w: dependency cycle through %s", ErrInvalid, in)
		case done:
			continue
		}
		ins, need, err := inputsOf(in, f.drv)
		if err != nil {
			return nil, err
		}
		if !need {
			mark[in] = done
			continue
		}
		mark[in] = onStack
		stack = append(stack, &frame{drv: in, inputs: ins})
	}
	return order, nil
}

// NixName is a derivation's name without hash and ".drv".
func NixName(drv string) string {
	base := strings.TrimPrefix(drv, StoreDir+"/")
	if len(base) > 33 {
		base = base[33:]
	}
	return strings.TrimSuffix(base, ".drv")
}

func applyCancelBuild(c *applyCtx, m *pb.CancelBuild) (uint64, error) {
	w := newWork(c)
	b, err := w.build(m.Id)
	if err != nil {
		return 0, err
	}
	if b.State != pb.BuildState_BUILD_STATE_QUEUED {
		return 0, fmt.Errorf("%w: build %d is already finished", ErrConflict, m.Id)
	}
	reason := m.Reason
	if reason == "" {
		reason = "cancelled by request"
	}
	if err := w.finishBuild(b, 4, reason); err != nil {
		return 0, err
	}
	return b.Id, w.flush()
}

// applyRestartBuild queues a finished build again: every step of its
// closure that did not succeed gets a fresh attempt.
func applyRestartBuild(c *applyCtx, m *pb.RestartBuild) (uint64, error) {
	w := newWork(c)
	b, err := w.build(m.Id)
	if err != nil {
		return 0, err
	}
	if b.State != pb.BuildState_BUILD_STATE_FINISHED {
		return 0, fmt.Errorf("%w: build %d is not finished", ErrConflict, m.Id)
	}
	b.Restarts++
	if err := w.queue(b, nil, "restarted"); err != nil {
		return 0, err
	}
	return b.Id, w.flush()
}

// applySetBuildPriority changes a queued build's priority or bumps it to
// the front. Its unfinished steps take the new order; a step other builds
// also need keeps the highest priority among them.
func applySetBuildPriority(c *applyCtx, m *pb.SetBuildPriority) (uint64, error) {
	if !m.SetPriority && !m.Bump {
		return 0, fmt.Errorf("%w: nothing to change", ErrInvalid)
	}
	w := newWork(c)
	b, err := w.build(m.Id)
	if err != nil {
		return 0, err
	}
	if b.State != pb.BuildState_BUILD_STATE_QUEUED {
		return 0, fmt.Errorf("%w: build %d is already finished", ErrConflict, m.Id)
	}
	if m.SetPriority {
		b.Priority = m.Priority
	}
	if m.Bump {
		// Later bumps go before earlier ones.
		b.GlobalPriority = max(b.GlobalPriority, c.now)
	}
	what := fmt.Sprintf("priority %d", b.Priority)
	if m.Bump {
		what = "bumped to the front"
	}
	b.StateHistory = append(b.StateHistory, &pb.StateChange{At: c.now, State: "queued", Reason: what})
	seen := map[string]bool{b.DrvPath: true}
	stack := []string{b.DrvPath}
	for len(stack) > 0 {
		drv := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		s, err := w.step(drv)
		if err != nil {
			return 0, err
		}
		if s == nil || terminal(s.State) {
			continue
		}
		if s.Refs <= 1 {
			s.Priority, s.GlobalPriority = b.Priority, b.GlobalPriority
		} else {
			s.Priority, s.GlobalPriority = max(s.Priority, b.Priority), max(s.GlobalPriority, b.GlobalPriority)
		}
		for _, in := range s.InputDrvs {
			if !seen[in] {
				seen[in] = true
				stack = append(stack, in)
			}
		}
	}
	return b.Id, w.flush()
}
