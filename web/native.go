package web

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/web/openapi"
)

func (a *api) routesNative() {
	m := a.mux
	m.HandleFunc("GET /api/v1/openapi.yaml", serveYAML(openapi.KilnYAML()))
	m.HandleFunc("GET /api/v1/hydra-openapi.yaml", serveYAML(openapi.HydraYAML()))

	m.HandleFunc("GET /api/v1/projects", a.listProjects)
	m.HandleFunc("GET /api/v1/projects/{project}", a.getProject)
	m.HandleFunc("PUT /api/v1/projects/{project}", a.need(roleCreateProjects, a.putProject))
	m.HandleFunc("DELETE /api/v1/projects/{project}", a.need(roleCreateProjects, a.deleteProject))
	m.HandleFunc("GET /api/v1/projects/{project}/jobsets", a.listJobsets)
	m.HandleFunc("GET /api/v1/projects/{project}/jobsets/{jobset}", a.getJobset)
	m.HandleFunc("PUT /api/v1/projects/{project}/jobsets/{jobset}", a.need(roleCreateProjects, a.putJobset))
	m.HandleFunc("DELETE /api/v1/projects/{project}/jobsets/{jobset}", a.need(roleCreateProjects, a.deleteJobset))
	m.HandleFunc("POST /api/v1/projects/{project}/jobsets/{jobset}/evaluations", a.need(roleEvalJobset, a.createEval))

	m.HandleFunc("GET /api/v1/evaluations", a.listEvals)
	m.HandleFunc("GET /api/v1/evaluations/{eval}", a.getEval)
	m.HandleFunc("POST /api/v1/evaluations/{eval}/cancel", a.need(roleCancelBuild, a.cancelEval))

	m.HandleFunc("POST /api/v1/builds", a.need(roleAdmin, a.submitBuild))
	m.HandleFunc("GET /api/v1/builds", a.listBuilds)
	m.HandleFunc("GET /api/v1/builds/{id}", a.getBuild)
	m.HandleFunc("GET /api/v1/builds/{id}/steps", a.buildSteps)
	m.HandleFunc("GET /api/v1/builds/{id}/log", a.hydraBuildLog)
	m.HandleFunc("POST /api/v1/builds/{id}/cancel", a.need(roleCancelBuild, a.cancelBuild))
	m.HandleFunc("POST /api/v1/builds/{id}/restart", a.need(roleRestartJobs, a.restartBuild))
	m.HandleFunc("POST /api/v1/builds/{id}/bump", a.need(roleBumpToFront, a.bumpBuild))
	m.HandleFunc("PUT /api/v1/builds/{id}/priority", a.need(roleBumpToFront, a.setPriority))

	m.HandleFunc("GET /api/v1/steps", a.listSteps)
	m.HandleFunc("GET /api/v1/steps/{drv}", a.getStep)
	m.HandleFunc("GET /api/v1/steps/{drv}/logs", a.stepLogs)
	m.HandleFunc("GET /api/v1/steps/{drv}/logs/{attempt}", a.stepLog)

	m.HandleFunc("GET /api/v1/status", a.status)
	m.HandleFunc("GET /api/v1/status/short", a.statusShort)

	m.HandleFunc("GET /api/v1/users", a.need(roleAdmin, a.listUsers))
	m.HandleFunc("PUT /api/v1/users/{name}", a.need(roleAdmin, a.putUser))
	m.HandleFunc("DELETE /api/v1/users/{name}", a.need(roleAdmin, a.deleteUser))
}

func serveYAML(b []byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/yaml")
		_, _ = w.Write(b)
	}
}

// checkParams refuses query parameters a list does not know, naming the
// ones it does.
func checkParams(q url.Values, valid ...string) error {
	for k := range q {
		if k == "format" || k == "min_index" {
			continue
		}
		if !slices.Contains(valid, k) {
			return fmt.Errorf("%w: unknown parameter %q (valid: %s)", raftfsm.ErrInvalid, trunc(k), strings.Join(valid, ", "))
		}
	}
	return nil
}

// listQuery reads a list's query: only params (and page, per_page) are
// allowed. It answers the error itself and reports whether to go on.
func listQuery(w http.ResponseWriter, r *http.Request, params ...string) (q url.Values, pg, perPage int, ok bool) {
	q = r.URL.Query()
	if err := checkParams(q, append(params, "page", "per_page")...); err != nil {
		WriteError(w, err)
		return nil, 0, 0, false
	}
	pg, perPage, err := pagination(q)
	if err != nil {
		WriteError(w, err)
		return nil, 0, 0, false
	}
	return q, pg, perPage, true
}

// page cuts a slice to the requested page.
func page[T any](xs []T, pg, perPage int) []T {
	lo := min((pg-1)*perPage, len(xs))
	return xs[lo:min(lo+perPage, len(xs))]
}

// Projects and jobsets.

// ProjectJSON is a project in /api/v1.
type ProjectJSON struct {
	Name        string   `json:"name"`
	DisplayName string   `json:"display_name"`
	Description string   `json:"description"`
	Homepage    string   `json:"homepage"`
	Owner       string   `json:"owner"`
	Enabled     bool     `json:"enabled"`
	Hidden      bool     `json:"hidden"`
	CreatedAt   int64    `json:"created_at"`
	Jobsets     []string `json:"jobsets"`
}

func projectJSON(p *pb.Project, js []*pb.Jobset) ProjectJSON {
	out := ProjectJSON{Name: p.Name, DisplayName: p.DisplayName, Description: p.Description, Homepage: p.Homepage,
		Owner: p.Owner, Enabled: p.Enabled, Hidden: p.Hidden, CreatedAt: p.CreatedAt, Jobsets: []string{}}
	for _, j := range js {
		out.Jobsets = append(out.Jobsets, j.Name)
	}
	return out
}

func (a *api) listProjects(w http.ResponseWriter, r *http.Request) {
	_, pg, perPage, ok := listQuery(w, r)
	if !ok {
		return
	}
	rd := a.cfg.Backend.Read()
	ps, err := rd.Projects()
	if err != nil {
		WriteError(w, err)
		return
	}
	items := []ProjectJSON{}
	for _, p := range page(ps, pg, perPage) {
		js, err := rd.Jobsets(p.Name)
		if err != nil {
			WriteError(w, err)
			return
		}
		items = append(items, projectJSON(p, js))
	}
	WriteJSON(w, http.StatusOK, map[string]any{"items": items, "meta": meta(r.URL, pg, perPage, len(ps))})
}

func (a *api) getProject(w http.ResponseWriter, r *http.Request) {
	if p, js, ok := a.projectOf(w, r); ok {
		WriteJSON(w, http.StatusOK, projectJSON(p, js))
	}
}

// projectOf reads the project named in the path and its jobsets,
// answering the error itself.
func (a *api) projectOf(w http.ResponseWriter, r *http.Request) (*pb.Project, []*pb.Jobset, bool) {
	rd := a.cfg.Backend.Read()
	p, err := rd.Project(r.PathValue("project"))
	if err != nil {
		WriteError(w, err)
		return nil, nil, false
	}
	js, err := rd.Jobsets(p.Name)
	if err != nil {
		WriteError(w, err)
		return nil, nil, false
	}
	return p, js, true
}

type projectIn struct {
	DisplayName string `json:"display_name"`
	Description string `json:"description"`
	Homepage    string `json:"homepage"`
	Owner       string `json:"owner"`
	Enabled     *bool  `json:"enabled"`
	Hidden      bool   `json:"hidden"`
}

func (a *api) putProject(w http.ResponseWriter, r *http.Request) {
	var in projectIn
	if err := decodeJSON(w, r, a.cfg.MaxBodyBytes, &in); err != nil {
		WriteError(w, err)
		return
	}
	if err := validText(in.DisplayName, in.Description, in.Homepage, in.Owner); err != nil {
		WriteError(w, err)
		return
	}
	name := r.PathValue("project")
	p := &pb.Project{Name: name, DisplayName: in.DisplayName, Description: in.Description, Homepage: in.Homepage,
		Owner: in.Owner, Enabled: in.Enabled == nil || *in.Enabled, Hidden: in.Hidden}
	if p.DisplayName == "" {
		p.DisplayName = name
	}
	_, existsErr := a.cfg.Backend.Read().Project(name)
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_PUT_PROJECT, &pb.PutProject{Project: p}); err != nil {
		WriteError(w, err)
		return
	}
	status := http.StatusCreated
	if existsErr == nil {
		status = http.StatusOK
	}
	rd := a.cfg.Backend.Read()
	stored, err := rd.Project(name)
	if err != nil {
		WriteError(w, err)
		return
	}
	js, _ := rd.Jobsets(name)
	w.Header().Set("Location", "/api/v1/projects/"+url.PathEscape(name))
	WriteJSON(w, status, projectJSON(stored, js))
}

func (a *api) deleteProject(w http.ResponseWriter, r *http.Request) {
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_DELETE_PROJECT, &pb.DeleteProject{Name: r.PathValue("project")}); err != nil {
		WriteError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// JobsetJSON is a jobset in /api/v1.
type JobsetJSON struct {
	Project          string            `json:"project"`
	Name             string            `json:"name"`
	Description      string            `json:"description"`
	NixExprInput     string            `json:"nix_expr_input"`
	NixExprPath      string            `json:"nix_expr_path"`
	Enabled          int32             `json:"enabled"`
	Hidden           bool              `json:"hidden"`
	CheckInterval    int32             `json:"check_interval"`
	SchedulingShares int32             `json:"scheduling_shares"`
	KeepNr           int32             `json:"keep_nr"`
	EnableEmail      bool              `json:"enable_email"`
	EmailOverride    string            `json:"email_override"`
	Inputs           []JobsetInputJSON `json:"inputs"`
	CreatedAt        int64             `json:"created_at"`
	LastCheckedAt    int64             `json:"last_checked_at"`
	TriggerTime      int64             `json:"trigger_time"`
}

// JobsetInputJSON is one input of a jobset.
type JobsetInputJSON struct {
	Name             string `json:"name"`
	Type             string `json:"type"`
	Value            string `json:"value"`
	EmailResponsible bool   `json:"email_responsible"`
}

func jobsetJSON(j *pb.Jobset) JobsetJSON {
	out := JobsetJSON{Project: j.Project, Name: j.Name, Description: j.Description, NixExprInput: j.NixExprInput,
		NixExprPath: j.NixExprPath, Enabled: j.Enabled, Hidden: j.Hidden, CheckInterval: j.CheckInterval,
		SchedulingShares: j.SchedulingShares, KeepNr: j.KeepNr, EnableEmail: j.EnableEmail, EmailOverride: j.EmailOverride,
		Inputs: []JobsetInputJSON{}, CreatedAt: j.CreatedAt, LastCheckedAt: j.LastCheckedAt, TriggerTime: j.TriggerTime}
	for _, in := range j.Inputs {
		out.Inputs = append(out.Inputs, JobsetInputJSON{Name: in.Name, Type: in.Type, Value: in.Value, EmailResponsible: in.EmailResponsible})
	}
	return out
}

func (a *api) listJobsets(w http.ResponseWriter, r *http.Request) {
	_, pg, perPage, ok := listQuery(w, r)
	if !ok {
		return
	}
	rd := a.cfg.Backend.Read()
	if _, err := rd.Project(r.PathValue("project")); err != nil {
		WriteError(w, err)
		return
	}
	js, err := rd.Jobsets(r.PathValue("project"))
	if err != nil {
		WriteError(w, err)
		return
	}
	items := []JobsetJSON{}
	for _, j := range page(js, pg, perPage) {
		items = append(items, jobsetJSON(j))
	}
	WriteJSON(w, http.StatusOK, map[string]any{"items": items, "meta": meta(r.URL, pg, perPage, len(js))})
}

func (a *api) getJobset(w http.ResponseWriter, r *http.Request) {
	j, err := a.cfg.Backend.Read().Jobset(r.PathValue("project"), r.PathValue("jobset"))
	if err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, jobsetJSON(j))
}

type jobsetIn struct {
	Description      string            `json:"description"`
	NixExprInput     string            `json:"nix_expr_input"`
	NixExprPath      string            `json:"nix_expr_path"`
	Enabled          *int32            `json:"enabled"`
	Hidden           bool              `json:"hidden"`
	CheckInterval    int32             `json:"check_interval"`
	SchedulingShares int32             `json:"scheduling_shares"`
	KeepNr           int32             `json:"keep_nr"`
	EnableEmail      bool              `json:"enable_email"`
	EmailOverride    string            `json:"email_override"`
	Inputs           []JobsetInputJSON `json:"inputs"`
}

func (a *api) putJobset(w http.ResponseWriter, r *http.Request) {
	var in jobsetIn
	if err := decodeJSON(w, r, a.cfg.MaxBodyBytes, &in); err != nil {
		WriteError(w, err)
		return
	}
	project, name := r.PathValue("project"), r.PathValue("jobset")
	h := hydraJobsetIn{Description: in.Description, NixExprInput: in.NixExprInput, NixExprPath: in.NixExprPath,
		Enabled: in.Enabled, KeepNr: in.KeepNr, CheckInterval: in.CheckInterval, SchedulingShares: in.SchedulingShares,
		EnableEmail: flexBool(in.EnableEmail), EmailOverride: in.EmailOverride, Inputs: map[string]hydraJobsetInput{}}
	hidden := flexBool(in.Hidden)
	h.Hidden = &hidden
	for _, i := range in.Inputs {
		if _, dup := h.Inputs[i.Name]; dup {
			WriteError(w, fmt.Errorf("%w: input %q given twice", raftfsm.ErrInvalid, trunc(i.Name)))
			return
		}
		h.Inputs[i.Name] = hydraJobsetInput{Name: i.Name, Type: i.Type, Value: i.Value, EmailResponsible: i.EmailResponsible}
	}
	j, err := jobsetFromHydra(project, name, h)
	if err != nil {
		WriteError(w, err)
		return
	}
	_, existsErr := a.cfg.Backend.Read().Jobset(project, name)
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_PUT_JOBSET, &pb.PutJobset{Jobset: j}); err != nil {
		WriteError(w, err)
		return
	}
	stored, err := a.cfg.Backend.Read().Jobset(project, name)
	if err != nil {
		WriteError(w, err)
		return
	}
	status := http.StatusCreated
	if existsErr == nil {
		status = http.StatusOK
	}
	w.Header().Set("Location", "/api/v1/projects/"+url.PathEscape(project)+"/jobsets/"+url.PathEscape(name))
	WriteJSON(w, status, jobsetJSON(stored))
}

func (a *api) deleteJobset(w http.ResponseWriter, r *http.Request) {
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_DELETE_JOBSET, &pb.DeleteJobset{Project: r.PathValue("project"), Name: r.PathValue("jobset")}); err != nil {
		WriteError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// Evaluations.

// EvaluationJSON is an evaluation in /api/v1.
type EvaluationJSON struct {
	ID           uint64                   `json:"id"`
	Project      string                   `json:"project"`
	Jobset       string                   `json:"jobset"`
	Timestamp    int64                    `json:"timestamp"`
	CheckoutTime int64                    `json:"checkout_time"`
	EvalTime     int64                    `json:"eval_time"`
	HasNewBuilds bool                     `json:"has_new_builds"`
	Flake        string                   `json:"flake"`
	Inputs       map[string]EvalInputJSON `json:"inputs"`
	Builds       []uint64                 `json:"builds"`
	Cancelled    bool                     `json:"cancelled"`
	// Finished and Counts are in the answer for one evaluation, not in
	// lists (they read every build of the evaluation).
	Finished *bool       `json:"finished,omitempty"`
	Counts   *EvalCounts `json:"counts,omitempty"`
}

// EvalInputJSON is the value an input had in an evaluation.
type EvalInputJSON struct {
	Type     string `json:"type"`
	Value    string `json:"value"`
	Revision string `json:"revision"`
	URI      string `json:"uri"`
}

// EvalCounts summarises an evaluation's builds.
type EvalCounts struct {
	Total     int `json:"total"`
	Queued    int `json:"queued"`
	Succeeded int `json:"succeeded"`
	Failed    int `json:"failed"`
}

func evalJSON(rd *raftfsm.Reader, e *pb.Eval, withCounts bool) EvaluationJSON {
	out := EvaluationJSON{ID: e.Id, Project: e.Project, Jobset: e.Jobset, Timestamp: e.Timestamp, CheckoutTime: e.CheckoutTime,
		EvalTime: e.EvalTime, HasNewBuilds: e.HasNewBuilds, Flake: e.Flake, Inputs: map[string]EvalInputJSON{},
		Builds: e.Builds, Cancelled: e.Cancelled}
	if out.Builds == nil {
		out.Builds = []uint64{}
	}
	for k, in := range e.Inputs {
		out.Inputs[k] = EvalInputJSON{Type: in.Type, Value: in.Value, Revision: in.Revision, URI: in.Uri}
	}
	if !withCounts {
		return out
	}
	out.Counts = &EvalCounts{}
	for _, id := range e.Builds {
		b, err := rd.Build(id)
		if err != nil {
			continue
		}
		out.Counts.Total++
		switch {
		case b.State != pb.BuildState_BUILD_STATE_FINISHED:
			out.Counts.Queued++
		case b.BuildStatus == 0:
			out.Counts.Succeeded++
		default:
			out.Counts.Failed++
		}
	}
	finished := out.Counts.Queued == 0
	out.Finished = &finished
	return out
}

func (a *api) listEvals(w http.ResponseWriter, r *http.Request) {
	q, pg, perPage, ok := listQuery(w, r, "project", "jobset")
	if !ok {
		return
	}
	if q.Get("jobset") != "" && q.Get("project") == "" {
		WriteError(w, fmt.Errorf("%w: jobset needs project", raftfsm.ErrInvalid))
		return
	}
	rd := a.cfg.Backend.Read()
	evals, total, err := rd.Evals(raftfsm.EvalFilter{Project: q.Get("project"), Jobset: q.Get("jobset")}, (pg-1)*perPage, perPage)
	if err != nil {
		WriteError(w, err)
		return
	}
	items := make([]EvaluationJSON, len(evals))
	for i, e := range evals {
		items[i] = evalJSON(rd, e, false)
	}
	WriteJSON(w, http.StatusOK, map[string]any{"items": items, "meta": meta(r.URL, pg, perPage, total)})
}

func (a *api) getEval(w http.ResponseWriter, r *http.Request) {
	if e, ok := a.evalOf(w, r); ok {
		WriteJSON(w, http.StatusOK, evalJSON(a.cfg.Backend.Read(), e, true))
	}
}

type evalJobJSON struct {
	Job      string           `json:"job"`
	DrvPath  string           `json:"drv_path"`
	Graph    []derivationJSON `json:"graph"`
	Priority int32            `json:"priority"`
}

type createEvalJSON struct {
	CheckoutTime int64                    `json:"checkout_time"`
	EvalTime     int64                    `json:"eval_time"`
	Flake        string                   `json:"flake"`
	Inputs       map[string]EvalInputJSON `json:"inputs"`
	Jobs         []evalJobJSON            `json:"jobs"`
}

// createEval records an evaluation made outside the cluster (by an
// evaluator such as nix-eval-jobs) with the jobs it found.
func (a *api) createEval(w http.ResponseWriter, r *http.Request) {
	var in createEvalJSON
	if err := decodeJSON(w, r, a.cfg.MaxBodyBytes, &in); err != nil {
		WriteError(w, err)
		return
	}
	m := &pb.CreateEval{Eval: &pb.Eval{Project: r.PathValue("project"), Jobset: r.PathValue("jobset"),
		CheckoutTime: in.CheckoutTime, EvalTime: in.EvalTime, Flake: in.Flake, Inputs: map[string]*pb.EvalInput{}}}
	if len(in.Inputs) > 64 {
		WriteError(w, fmt.Errorf("%w: %d inputs (max 64)", raftfsm.ErrInvalid, len(in.Inputs)))
		return
	}
	if err := validText(in.Flake); err != nil {
		WriteError(w, err)
		return
	}
	for k, v := range in.Inputs {
		if err := raftfsm.ValidName("input", k); err != nil {
			WriteError(w, err)
			return
		}
		if err := validText(v.Type, v.Value, v.Revision, v.URI); err != nil {
			WriteError(w, err)
			return
		}
		m.Eval.Inputs[k] = &pb.EvalInput{Type: v.Type, Value: v.Value, Revision: v.Revision, Uri: v.URI}
	}
	for _, j := range in.Jobs {
		sb := submission(submitJSON{DrvPath: j.DrvPath, Graph: j.Graph, Job: j.Job, Priority: j.Priority})
		m.Builds = append(m.Builds, sb)
	}
	if err := raftfsm.ValidateCreateEval(m); err != nil {
		WriteError(w, err)
		return
	}
	res, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_CREATE_EVAL, m)
	if err != nil {
		WriteError(w, err)
		return
	}
	rd := a.cfg.Backend.Read()
	e, err := rd.Eval(res.ID)
	if err != nil {
		WriteError(w, err)
		return
	}
	w.Header().Set("Location", "/api/v1/evaluations/"+itoa(e.Id))
	WriteJSON(w, http.StatusCreated, evalJSON(rd, e, true))
}

func (a *api) cancelEval(w http.ResponseWriter, r *http.Request) {
	id, err := pathUint(r, "eval", "evaluation")
	if err != nil {
		WriteError(w, err)
		return
	}
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_CANCEL_EVAL, &pb.CancelEval{Id: id, Reason: "evaluation cancelled by request"}); err != nil {
		WriteError(w, err)
		return
	}
	rd := a.cfg.Backend.Read()
	e, err := rd.Eval(id)
	if err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusAccepted, evalJSON(rd, e, true))
}

// Builds.

func (a *api) submitBuild(w http.ResponseWriter, r *http.Request) {
	var req submitJSON
	if err := decodeJSON(w, r, a.cfg.MaxBodyBytes, &req); err != nil {
		WriteError(w, err)
		return
	}
	b, err := a.cfg.Backend.SubmitBuild(r.Context(), submission(req))
	if err != nil {
		WriteError(w, err)
		return
	}
	w.Header().Set("Location", fmt.Sprintf("/api/v1/builds/%d", b.Id))
	WriteJSON(w, http.StatusCreated, buildJSON(b))
}

// submission turns the JSON of a submission into its command.
func submission(req submitJSON) *pb.SubmitBuild {
	m := &pb.SubmitBuild{
		Build: &pb.Build{DrvPath: req.DrvPath, Project: req.Project, Jobset: req.Jobset, Job: req.Job, Priority: req.Priority},
	}
	for _, d := range req.Graph {
		n := &pb.DerivationNode{DrvPath: d.DrvPath, InputDrvs: d.InputDrvs, System: d.System, RequiredFeatures: d.RequiredFeatures}
		for _, name := range sortedMapKeys(d.Outputs) {
			n.Outputs = append(n.Outputs, &pb.Output{Name: name, Path: d.Outputs[name]})
		}
		m.Graph = append(m.Graph, n)
	}
	return m
}

func (a *api) getBuild(w http.ResponseWriter, r *http.Request) {
	if b, ok := a.buildOf(w, r); ok {
		WriteJSON(w, http.StatusOK, buildJSON(b))
	}
}

// buildStatuses are the values of the status filter besides "queued":
// the names of Hydra's buildstatus codes, as BuildJSON.status gives them.
var buildStatuses = map[string][]int32{
	"succeeded": {0}, "failed": {1}, "dependency-failed": {2}, "aborted": {3, 9}, "cancelled": {4},
	"failed-with-output": {6}, "timed-out": {7}, "log-limit-exceeded": {10}, "output-limit-exceeded": {11},
}

// statusName is the filter vocabulary's name of a finished build's code.
func statusName(code int32) string {
	for name, codes := range buildStatuses {
		if slices.Contains(codes, code) {
			return name
		}
	}
	return "failed" // Hydra: any other code is a failure
}

func buildFilter(q url.Values) (raftfsm.BuildFilter, error) {
	f := raftfsm.BuildFilter{Project: q.Get("project"), Jobset: q.Get("jobset"), Job: q.Get("job"), System: q.Get("system")}
	if f.Job != "" && f.Jobset == "" || f.Jobset != "" && f.Project == "" {
		return f, fmt.Errorf("%w: job needs jobset, and jobset needs project", raftfsm.ErrInvalid)
	}
	switch v := q.Get("finished"); v {
	case "":
	case "true":
		f.State = pb.BuildState_BUILD_STATE_FINISHED
	case "false":
		f.State = pb.BuildState_BUILD_STATE_QUEUED
	default:
		return f, fmt.Errorf("%w: finished %q: valid values are true, false", raftfsm.ErrInvalid, trunc(v))
	}
	if v := q.Get("status"); v != "" {
		codes, ok := buildStatuses[v]
		switch {
		case v == "queued":
			if f.State == pb.BuildState_BUILD_STATE_FINISHED {
				return f, fmt.Errorf("%w: status queued contradicts finished=true", raftfsm.ErrInvalid)
			}
			f.State = pb.BuildState_BUILD_STATE_QUEUED
		case ok:
			if f.State == pb.BuildState_BUILD_STATE_QUEUED {
				return f, fmt.Errorf("%w: status %s contradicts finished=false", raftfsm.ErrInvalid, v)
			}
			f.State, f.Statuses = pb.BuildState_BUILD_STATE_FINISHED, codes
		default:
			valid := append(sortedMapKeys(buildStatuses), "queued")
			slices.Sort(valid)
			return f, fmt.Errorf("%w: status %q: valid values are %s", raftfsm.ErrInvalid, trunc(v), strings.Join(valid, ", "))
		}
	}
	return f, nil
}

func (a *api) listBuilds(w http.ResponseWriter, r *http.Request) {
	q, pg, perPage, ok := listQuery(w, r, "project", "jobset", "job", "system", "status", "finished")
	if !ok {
		return
	}
	f, err := buildFilter(q)
	if err != nil {
		WriteError(w, err)
		return
	}
	builds, total, err := a.cfg.Backend.Read().Builds(f, (pg-1)*perPage, perPage)
	if err != nil {
		WriteError(w, err)
		return
	}
	items := make([]BuildJSON, len(builds))
	for i, b := range builds {
		items[i] = buildJSON(b)
	}
	WriteJSON(w, http.StatusOK, map[string]any{"items": items, "meta": meta(r.URL, pg, perPage, total)})
}

// buildAction commits a command about the build in the path and answers
// 202 with the build's new state.
func (a *api) buildAction(w http.ResponseWriter, r *http.Request, t pb.CommandType, m func(id uint64) (proto.Message, error)) {
	id, err := pathID(r)
	if err != nil {
		WriteError(w, err)
		return
	}
	msg, err := m(id)
	if err != nil {
		WriteError(w, err)
		return
	}
	if _, err := a.apply(r.Context(), t, msg); err != nil {
		WriteError(w, err)
		return
	}
	b, err := a.cfg.Backend.Read().Build(id)
	if err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusAccepted, buildJSON(b))
}

// optionalBody decodes a JSON body when there is one.
func (a *api) optionalBody(w http.ResponseWriter, r *http.Request, v any) error {
	if r.ContentLength == 0 {
		return nil
	}
	if err := decodeJSON(w, r, a.cfg.MaxBodyBytes, v); err != nil && !errors.Is(err, errEmptyBody) {
		return err
	}
	return nil
}

func (a *api) cancelBuild(w http.ResponseWriter, r *http.Request) {
	a.buildAction(w, r, pb.CommandType_COMMAND_TYPE_CANCEL_BUILD, func(id uint64) (proto.Message, error) {
		var req struct {
			Reason string `json:"reason"`
		}
		if err := a.optionalBody(w, r, &req); err != nil {
			return nil, err
		}
		if err := validText(req.Reason); err != nil {
			return nil, err
		}
		return &pb.CancelBuild{Id: id, Reason: req.Reason}, nil
	})
}

func (a *api) restartBuild(w http.ResponseWriter, r *http.Request) {
	a.buildAction(w, r, pb.CommandType_COMMAND_TYPE_RESTART_BUILD, func(id uint64) (proto.Message, error) {
		return &pb.RestartBuild{Id: id}, nil
	})
}

func (a *api) bumpBuild(w http.ResponseWriter, r *http.Request) {
	a.buildAction(w, r, pb.CommandType_COMMAND_TYPE_SET_BUILD_PRIORITY, func(id uint64) (proto.Message, error) {
		return &pb.SetBuildPriority{Id: id, Bump: true}, nil
	})
}

func (a *api) setPriority(w http.ResponseWriter, r *http.Request) {
	a.buildAction(w, r, pb.CommandType_COMMAND_TYPE_SET_BUILD_PRIORITY, func(id uint64) (proto.Message, error) {
		var req struct {
			Priority *int32 `json:"priority"`
		}
		if err := decodeJSON(w, r, a.cfg.MaxBodyBytes, &req); err != nil {
			return nil, err
		}
		if req.Priority == nil {
			return nil, fmt.Errorf("%w: give {\"priority\": n}", raftfsm.ErrInvalid)
		}
		return &pb.SetBuildPriority{Id: id, SetPriority: true, Priority: *req.Priority}, nil
	})
}

// Steps and logs.

var stepStateNames = map[string]pb.StepState{}

func init() {
	for st, name := range stepStates {
		stepStateNames[name] = st
	}
}

func (a *api) listSteps(w http.ResponseWriter, r *http.Request) {
	q, pg, perPage, ok := listQuery(w, r, "state", "system")
	if !ok {
		return
	}
	states := []pb.StepState{pb.StepState_STEP_STATE_LEASED, pb.StepState_STEP_STATE_RUNNABLE, pb.StepState_STEP_STATE_WAITING}
	if v := q.Get("state"); v != "" {
		st, ok := stepStateNames[v]
		if !ok {
			valid := sortedMapKeys(stepStateNames)
			WriteError(w, fmt.Errorf("%w: state %q: valid values are %s", raftfsm.ErrInvalid, trunc(v), strings.Join(valid, ", ")))
			return
		}
		states = []pb.StepState{st}
	}
	rd := a.cfg.Backend.Read()
	var sys []string
	if v := q.Get("system"); v != "" {
		sys = []string{v}
	}
	var items []*pb.Step
	total, offset := 0, (pg-1)*perPage
	for _, st := range states {
		each, err := rd.StepsIn(nil, st, sys...)
		if err != nil {
			WriteError(w, err)
			return
		}
		each(func(s raftfsm.StepRef) bool {
			if total >= offset && len(items) < perPage {
				items = append(items, s.Step())
			}
			total++
			return true
		})
	}
	wc := a.waitingReasons(r.Context(), rd)
	out := make([]StepJSON, len(items))
	for i, s := range items {
		out[i] = stepJSON(rd, s, wc)
	}
	WriteJSON(w, http.StatusOK, map[string]any{"items": out, "meta": meta(r.URL, pg, perPage, total)})
}

// stepOf resolves {drv}: a derivation's file name (hash-name.drv).
func (a *api) stepOf(w http.ResponseWriter, r *http.Request) (*raftfsm.Reader, *pb.Step, bool) {
	name := r.PathValue("drv")
	drv := raftfsm.StoreDir + "/" + name
	if err := raftfsm.ValidDrvPath(drv); err != nil || strings.Contains(name, "/") {
		WriteError(w, fmt.Errorf("%w: %q is not a derivation file name (<hash>-<name>.drv)", raftfsm.ErrInvalid, trunc(name)))
		return nil, nil, false
	}
	rd := a.cfg.Backend.Read()
	s, err := rd.Step(drv)
	if err != nil {
		WriteError(w, err)
		return nil, nil, false
	}
	return rd, s, true
}

func (a *api) getStep(w http.ResponseWriter, r *http.Request) {
	rd, s, ok := a.stepOf(w, r)
	if !ok {
		return
	}
	WriteJSON(w, http.StatusOK, stepJSON(rd, s, a.waitingReasons(r.Context(), rd)))
}

// LogJSON describes one stored attempt's log.
type LogJSON struct {
	Attempt    uint32 `json:"attempt"`
	Size       uint64 `json:"size"`
	CreatedAt  int64  `json:"created_at"`
	Incomplete bool   `json:"incomplete"`
	URL        string `json:"url"`
}

func (a *api) stepLogs(w http.ResponseWriter, r *http.Request) {
	rd, s, ok := a.stepOf(w, r)
	if !ok {
		return
	}
	recs, err := rd.Logs(s.DrvPath)
	if err != nil {
		WriteError(w, err)
		return
	}
	out := []LogJSON{}
	for _, l := range recs {
		out = append(out, LogJSON{Attempt: l.Attempt, Size: l.Size, CreatedAt: l.CreatedAt, Incomplete: l.Incomplete,
			URL: r.URL.Path + "/" + strconv.FormatUint(uint64(l.Attempt), 10)})
	}
	WriteJSON(w, http.StatusOK, map[string]any{"drv_path": s.DrvPath, "logs": out})
}

func (a *api) stepLog(w http.ResponseWriter, r *http.Request) {
	rd, s, ok := a.stepOf(w, r)
	if !ok {
		return
	}
	n, err := strconv.ParseUint(r.PathValue("attempt"), 10, 32)
	if err != nil {
		WriteError(w, fmt.Errorf("%w: attempt %q is not a number", raftfsm.ErrInvalid, trunc(r.PathValue("attempt"))))
		return
	}
	recs, err := rd.Logs(s.DrvPath)
	if err != nil {
		WriteError(w, err)
		return
	}
	for _, l := range recs {
		if uint64(l.Attempt) == n {
			a.cfg.Backend.ServeLog(w, r, l)
			return
		}
	}
	WriteError(w, fmt.Errorf("%w: no log of attempt %d of %s", raftfsm.ErrNotFound, n, s.DrvPath))
}
