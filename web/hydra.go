package web

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Roles that guard writes (a user with "admin" may do everything).
const (
	roleCreateProjects = "create-projects"
	roleEvalJobset     = "eval-jobset"
	roleCancelBuild    = "cancel-build"
	roleRestartJobs    = "restart-jobs"
	roleBumpToFront    = "bump-to-front"
	roleAdmin          = "admin"
)

// Hydra pages evaluations by this many.
const hydraEvalsPerPage = 20

func (a *api) routesHydra() {
	m := a.mux
	m.HandleFunc("POST /login", a.login)
	m.HandleFunc("GET /{$}", a.hydraProjects)
	m.HandleFunc("GET /project/{project}", a.hydraGetProject)
	m.HandleFunc("PUT /project/{project}", a.need(roleCreateProjects, a.hydraPutProject))
	m.HandleFunc("DELETE /project/{project}", a.need(roleCreateProjects, a.hydraDeleteProject))
	m.HandleFunc("GET /jobset/{project}/{jobset}", a.hydraGetJobset)
	m.HandleFunc("PUT /jobset/{project}/{jobset}", a.need(roleCreateProjects, a.hydraPutJobset))
	m.HandleFunc("DELETE /jobset/{project}/{jobset}", a.need(roleCreateProjects, a.hydraDeleteJobset))
	m.HandleFunc("GET /jobset/{project}/{jobset}/evals", a.hydraJobsetEvals)
	m.HandleFunc("GET /jobset/{project}/{jobset}/latest-eval", a.hydraLatestEval)
	m.HandleFunc("GET /api/jobsets", a.hydraJobsetOverview)
	m.HandleFunc("POST /api/push", a.need(roleEvalJobset, a.hydraPush))
	m.HandleFunc("GET /search", a.hydraSearch)
	m.HandleFunc("GET /build/{id}", a.hydraBuild)
	m.HandleFunc("GET /build/{id}/constituents", a.hydraConstituents)
	m.HandleFunc("GET /build/{id}/log", a.hydraBuildLog)
	m.HandleFunc("GET /build/{id}/log/raw", a.hydraBuildLog)
	m.HandleFunc("GET /build/{id}/nixlog/{step}", a.hydraStepLog)
	m.HandleFunc("GET /build/{id}/nixlog/{step}/raw", a.hydraStepLog)
	m.HandleFunc("GET /eval/{eval}", a.hydraEval)
	m.HandleFunc("GET /eval/{eval}/builds", a.hydraEvalBuilds)
	m.HandleFunc("GET /job/{project}/{jobset}/{job}/shield", a.hydraShield)
	m.HandleFunc("GET /job/{project}/{jobset}/{job}/latest", a.hydraLatest)
	m.HandleFunc("GET /job/{project}/{jobset}/{job}/latest-for/{system}", a.hydraLatest)
	m.HandleFunc("GET /job/{project}/{jobset}/{job}/latest-finished", a.hydraLatestFinished)
}

func (a *api) hydraProjects(w http.ResponseWriter, r *http.Request) {
	rd := a.cfg.Backend.Read()
	ps, err := rd.Projects()
	if err != nil {
		WriteError(w, err)
		return
	}
	out := make([]hydraProject, 0, len(ps))
	for _, p := range ps {
		js, err := rd.Jobsets(p.Name)
		if err != nil {
			WriteError(w, err)
			return
		}
		out = append(out, toHydraProject(p, js))
	}
	WriteJSON(w, http.StatusOK, out)
}

func (a *api) hydraGetProject(w http.ResponseWriter, r *http.Request) {
	if p, js, ok := a.projectOf(w, r); ok {
		WriteJSON(w, http.StatusOK, toHydraProject(p, js))
	}
}

// flexBool takes what Hydra's forms and clients send for a flag: a JSON
// boolean, 0/1, or "0"/"1"/"true"/"false"/"on"/"off".
type flexBool bool

func (f *flexBool) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch v := v.(type) {
	case bool:
		*f = flexBool(v)
		return nil
	case float64:
		if v == 0 || v == 1 {
			*f = v == 1
			return nil
		}
	case string:
		switch strings.ToLower(v) {
		case "1", "true", "on":
			*f = true
			return nil
		case "0", "false", "off", "":
			*f = false
			return nil
		}
	case nil:
		*f = false
		return nil
	}
	return fmt.Errorf("%s is not a boolean", trunc(string(b)))
}

type hydraProjectIn struct {
	Name                    string          `json:"name"`
	DisplayName             string          `json:"displayname"`
	Description             string          `json:"description"`
	Homepage                string          `json:"homepage"`
	Owner                   string          `json:"owner"`
	Enabled                 *flexBool       `json:"enabled"`
	Visible                 *flexBool       `json:"visible"`
	Hidden                  *flexBool       `json:"hidden"`
	EnableDynamicRunCommand flexBool        `json:"enable_dynamic_run_command"`
	Declarative             json.RawMessage `json:"declarative"`
}

func (a *api) hydraPutProject(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("project")
	var in hydraProjectIn
	if err := decodeJSONLenient(w, r, a.cfg.MaxBodyBytes, &in); err != nil {
		WriteError(w, err)
		return
	}
	if in.Name != "" && in.Name != name {
		WriteError(w, fmt.Errorf("%w: body names project %q, the URL %q", raftfsm.ErrInvalid, trunc(in.Name), trunc(name)))
		return
	}
	p := &pb.Project{Name: name, DisplayName: in.DisplayName, Description: in.Description, Homepage: in.Homepage,
		Owner: in.Owner, Enabled: in.Enabled == nil || bool(*in.Enabled)}
	if in.Visible != nil {
		p.Hidden = !bool(*in.Visible)
	}
	if in.Hidden != nil {
		p.Hidden = bool(*in.Hidden)
	}
	if p.DisplayName == "" {
		p.DisplayName = name
	}
	if err := validText(p.DisplayName, p.Description, p.Homepage, p.Owner); err != nil {
		WriteError(w, err)
		return
	}
	_, existsErr := a.cfg.Backend.Read().Project(name)
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_PUT_PROJECT, &pb.PutProject{Project: p}); err != nil {
		WriteError(w, err)
		return
	}
	uri := "/project/" + url.PathEscape(name)
	w.Header().Set("Location", uri)
	if existsErr == nil {
		WriteJSON(w, http.StatusOK, map[string]string{"redirect": uri})
		return
	}
	WriteJSON(w, http.StatusCreated, map[string]string{"uri": uri, "name": name, "redirect": uri, "type": "project"})
}

// validText bounds free-text fields.
func validText(fields ...string) error {
	for _, f := range fields {
		if len(f) > 4096 {
			return fmt.Errorf("%w: a text field is over 4096 bytes", raftfsm.ErrInvalid)
		}
	}
	return nil
}

func (a *api) hydraDeleteProject(w http.ResponseWriter, r *http.Request) {
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_DELETE_PROJECT, &pb.DeleteProject{Name: r.PathValue("project")}); err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, map[string]string{"redirect": "/"})
}

func (a *api) hydraGetJobset(w http.ResponseWriter, r *http.Request) {
	j, err := a.cfg.Backend.Read().Jobset(r.PathValue("project"), r.PathValue("jobset"))
	if err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, toHydraJobset(j))
}

type hydraJobsetIn struct {
	Name             string                      `json:"name"`
	Project          string                      `json:"project"`
	Description      string                      `json:"description"`
	NixExprInput     string                      `json:"nixexprinput"`
	NixExprPath      string                      `json:"nixexprpath"`
	Enabled          *int32                      `json:"enabled"`
	Visible          *flexBool                   `json:"visible"`
	Hidden           *flexBool                   `json:"hidden"`
	KeepNr           int32                       `json:"keepnr"`
	CheckInterval    int32                       `json:"checkinterval"`
	SchedulingShares int32                       `json:"schedulingshares"`
	EnableEmail      flexBool                    `json:"enableemail"`
	EmailOverride    string                      `json:"emailoverride"`
	Type             int32                       `json:"type"`
	Flake            string                      `json:"flake"`
	Inputs           map[string]hydraJobsetInput `json:"inputs"`
}

func (a *api) hydraPutJobset(w http.ResponseWriter, r *http.Request) {
	project, name := r.PathValue("project"), r.PathValue("jobset")
	var in hydraJobsetIn
	if err := decodeJSONLenient(w, r, a.cfg.MaxBodyBytes, &in); err != nil {
		WriteError(w, err)
		return
	}
	j, err := jobsetFromHydra(project, name, in)
	if err != nil {
		WriteError(w, err)
		return
	}
	_, existsErr := a.cfg.Backend.Read().Jobset(project, name)
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_PUT_JOBSET, &pb.PutJobset{Jobset: j}); err != nil {
		WriteError(w, err)
		return
	}
	uri := "/jobset/" + url.PathEscape(project) + "/" + url.PathEscape(name)
	w.Header().Set("Location", uri)
	if existsErr == nil {
		WriteJSON(w, http.StatusOK, map[string]string{"redirect": uri})
		return
	}
	WriteJSON(w, http.StatusCreated, map[string]string{"uri": uri, "name": name, "redirect": uri, "type": "jobset"})
}

func jobsetFromHydra(project, name string, in hydraJobsetIn) (*pb.Jobset, error) {
	if (in.Name != "" && in.Name != name) || (in.Project != "" && in.Project != project) {
		return nil, fmt.Errorf("%w: body names another jobset than the URL", raftfsm.ErrInvalid)
	}
	if in.KeepNr < 0 || in.CheckInterval < 0 || in.SchedulingShares < 0 {
		return nil, fmt.Errorf("%w: keepnr, checkinterval and schedulingshares must not be negative", raftfsm.ErrInvalid)
	}
	if len(in.Inputs) > 64 {
		return nil, fmt.Errorf("%w: %d inputs (max 64)", raftfsm.ErrInvalid, len(in.Inputs))
	}
	if err := validText(in.Description, in.NixExprInput, in.NixExprPath, in.EmailOverride, in.Flake); err != nil {
		return nil, err
	}
	j := &pb.Jobset{Project: project, Name: name, Description: in.Description, NixExprInput: in.NixExprInput,
		NixExprPath: in.NixExprPath, Enabled: 1, KeepNr: in.KeepNr, CheckInterval: in.CheckInterval,
		SchedulingShares: in.SchedulingShares, EnableEmail: bool(in.EnableEmail), EmailOverride: in.EmailOverride}
	if j.SchedulingShares == 0 {
		j.SchedulingShares = 1
	}
	if in.Enabled != nil {
		j.Enabled = *in.Enabled
	}
	if in.Visible != nil {
		j.Hidden = !bool(*in.Visible)
	}
	if in.Hidden != nil {
		j.Hidden = bool(*in.Hidden)
	}
	for _, k := range sortedMapKeys(in.Inputs) {
		v := in.Inputs[k]
		if err := raftfsm.ValidName("input", k); err != nil {
			return nil, err
		}
		if err := validText(v.Type, v.Value); err != nil {
			return nil, err
		}
		j.Inputs = append(j.Inputs, &pb.JobsetInput{Name: k, Type: v.Type, Value: v.Value, EmailResponsible: v.EmailResponsible})
	}
	return j, nil
}

func (a *api) hydraDeleteJobset(w http.ResponseWriter, r *http.Request) {
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_DELETE_JOBSET, &pb.DeleteJobset{Project: r.PathValue("project"), Name: r.PathValue("jobset")}); err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, map[string]string{"redirect": "/project/" + url.PathEscape(r.PathValue("project"))})
}

func (a *api) hydraJobsetEvals(w http.ResponseWriter, r *http.Request) {
	rd := a.cfg.Backend.Read()
	j, err := rd.Jobset(r.PathValue("project"), r.PathValue("jobset"))
	if err != nil {
		WriteError(w, err)
		return
	}
	page := 1
	if s := r.URL.Query().Get("page"); s != "" {
		if page, err = strconv.Atoi(s); err != nil || page < 1 || page > 1<<20 {
			WriteError(w, fmt.Errorf("%w: page must be a positive integer", raftfsm.ErrInvalid))
			return
		}
	}
	evals, total, err := rd.Evals(raftfsm.EvalFilter{Project: j.Project, Jobset: j.Name}, (page-1)*hydraEvalsPerPage, hydraEvalsPerPage)
	if err != nil {
		WriteError(w, err)
		return
	}
	last := max(1, (total+hydraEvalsPerPage-1)/hydraEvalsPerPage)
	out := map[string]any{"first": "?page=1", "last": "?page=" + itoa(last)}
	if page < last {
		out["next"] = "?page=" + itoa(page+1)
	}
	list := make([]hydraEval, len(evals))
	for i, e := range evals {
		list[i] = toHydraEval(e)
	}
	out["evals"] = list
	WriteJSON(w, http.StatusOK, out)
}

func (a *api) hydraLatestEval(w http.ResponseWriter, r *http.Request) {
	e, err := a.cfg.Backend.Read().LatestEval(r.PathValue("project"), r.PathValue("jobset"))
	if err != nil {
		WriteError(w, err)
		return
	}
	redirect(w, r, "/eval/"+itoa(e.Id)+"?name="+url.QueryEscape(r.PathValue("jobset")))
}

// redirect answers 302 with a JSON body naming the target.
func redirect(w http.ResponseWriter, r *http.Request, to string) {
	w.Header().Set("Location", to)
	WriteJSON(w, http.StatusFound, map[string]string{"redirect": to})
}

func (a *api) hydraJobsetOverview(w http.ResponseWriter, r *http.Request) {
	project := r.URL.Query().Get("project")
	if project == "" {
		WriteError(w, fmt.Errorf("%w: give ?project=", raftfsm.ErrInvalid))
		return
	}
	rd := a.cfg.Backend.Read()
	if _, err := rd.Project(project); err != nil {
		WriteError(w, err)
		return
	}
	js, err := rd.Jobsets(project)
	if err != nil {
		WriteError(w, err)
		return
	}
	out := make([]hydraJobsetOverview, 0, len(js))
	for _, j := range js {
		o := hydraJobsetOverview{Name: j.Name, Project: j.Project, CheckInterval: j.CheckInterval,
			LastCheckedTime: nonZero(j.LastCheckedAt), TriggerTime: nonZero(j.TriggerTime)}
		// Counts are of the latest evaluation's builds, as in Hydra.
		if e, err := rd.LatestEval(j.Project, j.Name); err == nil {
			for _, id := range e.Builds {
				b, err := rd.Build(id)
				if err != nil {
					continue
				}
				o.NrTotal++
				switch {
				case b.State != pb.BuildState_BUILD_STATE_FINISHED:
					o.NrScheduled++
				case b.BuildStatus != 0:
					o.NrFailed++
				}
			}
		} else if !errors.Is(err, raftfsm.ErrNotFound) {
			WriteError(w, err)
			return
		}
		out = append(out, o)
	}
	WriteJSON(w, http.StatusOK, out)
}

func (a *api) hydraPush(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query().Get("jobsets")
	if q == "" {
		WriteError(w, fmt.Errorf("%w: give ?jobsets=project:jobset[,…]", raftfsm.ErrInvalid))
		return
	}
	refs := strings.Split(q, ",")
	if len(refs) > 1000 {
		WriteError(w, fmt.Errorf("%w: at most 1000 jobsets", raftfsm.ErrInvalid))
		return
	}
	for _, ref := range refs {
		if _, _, err := raftfsm.ParseJobsetRef(ref); err != nil {
			WriteError(w, err)
			return
		}
	}
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_TRIGGER_JOBSETS, &pb.TriggerJobsets{Jobsets: refs}); err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, map[string][]string{"jobsetsTriggered": refs})
}

// searchLimit bounds each list of a search answer.
const searchLimit = 50

func (a *api) hydraSearch(w http.ResponseWriter, r *http.Request) {
	query := strings.TrimSpace(r.URL.Query().Get("query"))
	if query == "" || len(query) > 256 {
		WriteError(w, fmt.Errorf("%w: give ?query= of 1 to 256 bytes", raftfsm.ErrInvalid))
		return
	}
	lq := strings.ToLower(query)
	has := func(fields ...string) bool {
		for _, f := range fields {
			if strings.Contains(strings.ToLower(f), lq) {
				return true
			}
		}
		return false
	}
	rd := a.cfg.Backend.Read()
	out := struct {
		Jobsets   []hydraJobset  `json:"jobsets"`
		Projects  []hydraProject `json:"projects"`
		Builds    []hydraBuild   `json:"builds"`
		BuildsDrv []hydraBuild   `json:"buildsdrv"`
	}{[]hydraJobset{}, []hydraProject{}, []hydraBuild{}, []hydraBuild{}}
	ps, err := rd.Projects()
	if err != nil {
		WriteError(w, err)
		return
	}
	for _, p := range ps {
		js, err := rd.Jobsets(p.Name)
		if err != nil {
			WriteError(w, err)
			return
		}
		if len(out.Projects) < searchLimit && has(p.Name, p.DisplayName, p.Description) {
			out.Projects = append(out.Projects, toHydraProject(p, js))
		}
		for _, j := range js {
			if len(out.Jobsets) < searchLimit && has(j.Name, j.Description) {
				out.Jobsets = append(out.Jobsets, toHydraJobset(j))
			}
		}
	}
	if strings.HasPrefix(query, raftfsm.StoreDir+"/") {
		bs, err := rd.BuildsOfDrv(query)
		if err != nil {
			WriteError(w, err)
			return
		}
		for i := len(bs) - 1; i >= 0 && len(out.BuildsDrv) < searchLimit; i-- {
			out.BuildsDrv = append(out.BuildsDrv, toHydraBuild(bs[i]))
		}
	}
	err = rd.EachBuildNewestFirst(func(b *pb.Build) bool {
		if has(b.Job, b.NixName) {
			out.Builds = append(out.Builds, toHydraBuild(b))
		}
		return len(out.Builds) < searchLimit
	})
	if err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, out)
}

func (a *api) buildOf(w http.ResponseWriter, r *http.Request) (*pb.Build, bool) {
	id, err := pathID(r)
	if err != nil {
		WriteError(w, err)
		return nil, false
	}
	b, err := a.cfg.Backend.Read().Build(id)
	if err != nil {
		WriteError(w, err)
		return nil, false
	}
	return b, true
}

func (a *api) hydraBuild(w http.ResponseWriter, r *http.Request) {
	if b, ok := a.buildOf(w, r); ok {
		WriteJSON(w, http.StatusOK, toHydraBuild(b))
	}
}

// hydraConstituents lists an aggregate job's constituents. Kiln has no
// aggregate jobs yet, so a known build has none.
func (a *api) hydraConstituents(w http.ResponseWriter, r *http.Request) {
	if _, ok := a.buildOf(w, r); ok {
		WriteJSON(w, http.StatusOK, []hydraBuild{})
	}
}

// hydraBuildLog is the raw log of the build's own derivation (its latest
// attempt).
func (a *api) hydraBuildLog(w http.ResponseWriter, r *http.Request) {
	b, ok := a.buildOf(w, r)
	if !ok {
		return
	}
	rec, err := a.cfg.Backend.Read().Log(b.DrvPath)
	if err != nil {
		WriteError(w, fmt.Errorf("%w: no log stored for build %d (%s)", raftfsm.ErrNotFound, b.Id, b.DrvPath))
		return
	}
	a.cfg.Backend.ServeLog(w, r, rec)
}

// hydraStepLog is the log of the build's n-th step (1-based, in the order
// of /api/v1/builds/{id}/steps).
func (a *api) hydraStepLog(w http.ResponseWriter, r *http.Request) {
	b, ok := a.buildOf(w, r)
	if !ok {
		return
	}
	n, err := pathUint(r, "step", "step")
	if err != nil {
		WriteError(w, err)
		return
	}
	rd := a.cfg.Backend.Read()
	steps, err := closureSteps(rd, b.DrvPath, int(n))
	if err != nil {
		WriteError(w, err)
		return
	}
	if uint64(len(steps)) < n {
		WriteError(w, fmt.Errorf("%w: build %d has %d steps", raftfsm.ErrNotFound, b.Id, len(steps)))
		return
	}
	s := steps[n-1]
	rec, err := rd.Log(s.DrvPath)
	if err != nil {
		WriteError(w, fmt.Errorf("%w: no log stored for %s", raftfsm.ErrNotFound, s.DrvPath))
		return
	}
	a.cfg.Backend.ServeLog(w, r, rec)
}

func (a *api) evalOf(w http.ResponseWriter, r *http.Request) (*pb.Eval, bool) {
	id, err := pathUint(r, "eval", "evaluation")
	if err != nil {
		WriteError(w, err)
		return nil, false
	}
	e, err := a.cfg.Backend.Read().Eval(id)
	if err != nil {
		WriteError(w, err)
		return nil, false
	}
	return e, true
}

func (a *api) hydraEval(w http.ResponseWriter, r *http.Request) {
	if e, ok := a.evalOf(w, r); ok {
		WriteJSON(w, http.StatusOK, toHydraEval(e))
	}
}

func (a *api) hydraEvalBuilds(w http.ResponseWriter, r *http.Request) {
	e, ok := a.evalOf(w, r)
	if !ok {
		return
	}
	rd := a.cfg.Backend.Read()
	out := make([]hydraBuild, 0, len(e.Builds))
	for _, id := range e.Builds {
		b, err := rd.Build(id)
		if err != nil {
			WriteError(w, err)
			return
		}
		out = append(out, toHydraBuild(b))
	}
	WriteJSON(w, http.StatusOK, out)
}

func jobFilter(r *http.Request) raftfsm.BuildFilter {
	return raftfsm.BuildFilter{Project: r.PathValue("project"), Jobset: r.PathValue("jobset"), Job: r.PathValue("job")}
}

// hydraShield is the shields.io endpoint for a job's latest finished build.
func (a *api) hydraShield(w http.ResponseWriter, r *http.Request) {
	f := jobFilter(r)
	f.State = pb.BuildState_BUILD_STATE_FINISHED
	bs, _, err := a.cfg.Backend.Read().Builds(f, 0, 1)
	if err != nil {
		WriteError(w, err)
		return
	}
	if len(bs) == 0 {
		WriteError(w, fmt.Errorf("%w: job %s:%s:%s has no finished build", raftfsm.ErrNotFound, f.Project, f.Jobset, f.Job))
		return
	}
	msg, color := "passing", "green"
	if st := bs[0].BuildStatus; st != 0 {
		msg, color = raftfsm.BuildStatusName(st), "red"
	}
	WriteJSON(w, http.StatusOK, map[string]any{"schemaVersion": 1, "label": "hydra build", "message": msg, "color": color})
}

// hydraLatest redirects to the job's latest successful build (for one
// system with /latest-for/{system}).
func (a *api) hydraLatest(w http.ResponseWriter, r *http.Request) {
	f := jobFilter(r)
	f.State, f.Statuses, f.System = pb.BuildState_BUILD_STATE_FINISHED, []int32{0}, r.PathValue("system")
	bs, _, err := a.cfg.Backend.Read().Builds(f, 0, 1)
	if err != nil {
		WriteError(w, err)
		return
	}
	if len(bs) == 0 {
		WriteError(w, fmt.Errorf("%w: job %s:%s:%s has no successful build", raftfsm.ErrNotFound, f.Project, f.Jobset, f.Job))
		return
	}
	redirect(w, r, "/build/"+itoa(bs[0].Id))
}

// hydraLatestFinished redirects to the job's successful build in the
// newest evaluation whose builds have all finished.
func (a *api) hydraLatestFinished(w http.ResponseWriter, r *http.Request) {
	f := jobFilter(r)
	rd := a.cfg.Backend.Read()
	evals, _, err := rd.Evals(raftfsm.EvalFilter{Project: f.Project, Jobset: f.Jobset}, 0, 100)
	if err != nil {
		WriteError(w, err)
		return
	}
	for _, e := range evals {
		var hit *pb.Build
		done := true
		for _, id := range e.Builds {
			b, err := rd.Build(id)
			if err != nil {
				WriteError(w, err)
				return
			}
			if b.State != pb.BuildState_BUILD_STATE_FINISHED {
				done = false
				break
			}
			if b.Job == f.Job && b.BuildStatus == 0 {
				hit = b
			}
		}
		if done && hit != nil {
			redirect(w, r, "/build/"+itoa(hit.Id))
			return
		}
	}
	WriteError(w, fmt.Errorf("%w: job %s:%s:%s has no successful build in a finished evaluation", raftfsm.ErrNotFound, f.Project, f.Jobset, f.Job))
}

func itoa[T ~int | ~int32 | ~int64 | ~uint64](v T) string { return fmt.Sprint(v) }
