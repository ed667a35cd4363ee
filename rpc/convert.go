package rpc

import (
	fsmpb "github.com/kilnci/kiln/raftfsm/fsmpb"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
)

// BuildToAPI converts a stored build to its API form.
func BuildToAPI(b *fsmpb.Build) *kilnv1.Build {
	if b == nil {
		return nil
	}
	return &kilnv1.Build{
		Id: b.Id, Project: b.Project, Jobset: b.Jobset, Job: b.Job, DrvPath: b.DrvPath,
		System: b.System, NixName: b.NixName, Priority: b.Priority, GlobalPriority: b.GlobalPriority,
		Finished: b.State == fsmpb.BuildState_BUILD_STATE_FINISHED, BuildStatus: b.BuildStatus,
		CreatedAt: b.CreatedAt, StartTime: b.StartTime, StopTime: b.StopTime,
		Outputs: OutputsToAPI(b.Outputs), Reason: b.Reason,
	}
}

// OutputsToAPI converts outputs to their API form.
func OutputsToAPI(os []*fsmpb.Output) []*kilnv1.Output {
	out := make([]*kilnv1.Output, len(os))
	for i, o := range os {
		out[i] = &kilnv1.Output{Name: o.Name, Path: o.Path}
	}
	return out
}

// SubmitFromAPI converts a submission to the command payload (ID unstamped).
func SubmitFromAPI(r *kilnv1.SubmitBuildRequest) *fsmpb.SubmitBuild {
	m := &fsmpb.SubmitBuild{
		Build: &fsmpb.Build{DrvPath: r.DrvPath, Project: r.Project, Jobset: r.Jobset, Job: r.Job, Priority: r.Priority},
		Graph: make([]*fsmpb.DerivationNode, len(r.Graph)),
	}
	for i, d := range r.Graph {
		n := &fsmpb.DerivationNode{DrvPath: d.DrvPath, InputDrvs: d.InputDrvs, System: d.System, RequiredFeatures: d.RequiredFeatures}
		for _, o := range d.Outputs {
			n.Outputs = append(n.Outputs, &fsmpb.Output{Name: o.GetName(), Path: o.GetPath()})
		}
		m.Graph[i] = n
	}
	return m
}
