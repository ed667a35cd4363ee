package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

type buildFlags struct {
	file        string
	attrs       []string
	coordinator string
	tokenFile   string
	store       string
	project     string
	jobset      string
	eval        bool
	timeout     time.Duration
}

func newBuildCmd() *cobra.Command {
	var f buildFlags
	cmd := &cobra.Command{
		Use:   "build [-f FILE] [-A ATTR]... [DRV...]",
		Short: "Evaluate locally, push the derivations to the cluster cache, build on the farm and print the outputs",
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.coordinator == "" || f.tokenFile == "" {
				return errors.New("--coordinator and --token-file are required")
			}
			tok, err := readToken(f.tokenFile)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), f.timeout)
			defer cancel()
			return runBuild(ctx, f, tok, args, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&f.file, "file", "f", "", "Nix file to evaluate")
	fl.StringArrayVarP(&f.attrs, "attr", "A", nil, "attribute to build (repeatable)")
	fl.StringVar(&f.coordinator, "coordinator", "", "URL of any coordinator")
	fl.StringVar(&f.tokenFile, "token-file", "", "file holding a token allowed to submit and push")
	fl.StringVar(&f.store, "store", "", "the local Nix store to evaluate in (default: the local store)")
	fl.StringVar(&f.project, "project", "", "project to file the builds under")
	fl.StringVar(&f.jobset, "jobset", "", "jobset to file the builds under")
	fl.BoolVar(&f.eval, "eval", false, "record the builds as one evaluation of --project/--jobset (jobs named by -A), as an evaluator would")
	fl.DurationVar(&f.timeout, "timeout", 2*time.Hour, "give up after this long")
	return cmd
}

// nixCmd runs a Nix command with the store option and returns stdout.
func nixCmd(ctx context.Context, store, name string, args ...string) (string, error) {
	if store != "" {
		args = append([]string{"--store", store}, args...)
	}
	c := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		return "", fmt.Errorf("%s: %v\n%s", name, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

type derivationJSON struct {
	DrvPath          string            `json:"drv_path"`
	Outputs          map[string]string `json:"outputs"`
	InputDrvs        []string          `json:"input_drvs,omitempty"`
	System           string            `json:"system"`
	RequiredFeatures []string          `json:"required_features,omitempty"`
}

// graphOf reads a derivation's closure with `nix show-derivation -r`.
func graphOf(ctx context.Context, store, drv string) ([]derivationJSON, error) {
	out, err := nixCmd(ctx, store, "nix", "--extra-experimental-features", "nix-command", "show-derivation", "-r", drv)
	if err != nil {
		return nil, err
	}
	var shown map[string]struct {
		Outputs   map[string]struct{ Path string } `json:"outputs"`
		InputDrvs map[string][]string              `json:"inputDrvs"`
		System    string                           `json:"system"`
		Env       map[string]string                `json:"env"`
	}
	if err := json.Unmarshal([]byte(out), &shown); err != nil {
		return nil, err
	}
	var graph []derivationJSON
	for p, d := range shown {
		g := derivationJSON{DrvPath: p, System: d.System, Outputs: map[string]string{}, RequiredFeatures: strings.Fields(d.Env["requiredSystemFeatures"])}
		for name, o := range d.Outputs {
			g.Outputs[name] = o.Path
		}
		for in := range d.InputDrvs {
			g.InputDrvs = append(g.InputDrvs, in)
		}
		slices.Sort(g.InputDrvs)
		graph = append(graph, g)
	}
	return graph, nil
}

type apiClient struct {
	base, token string
	hc          *http.Client
}

func (c *apiClient) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(b)))
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(b, out)
}

type buildStatus struct {
	ID          uint64            `json:"id"`
	DrvPath     string            `json:"drv_path"`
	Finished    bool              `json:"finished"`
	BuildStatus *int32            `json:"buildstatus"`
	Status      string            `json:"status"`
	Outputs     map[string]string `json:"outputs"`
}

type stepStatus struct {
	DrvPath   string `json:"drv_path"`
	State     string `json:"state"`
	LastError string `json:"last_error"`
	LeaseID   uint64 `json:"lease_id"`
	// BuildStatus is Hydra's code for a finished step: 2 marks a step that
	// failed only because something it needed did.
	BuildStatus *int32 `json:"buildstatus"`
}

// liveLogs prints what running steps' logs gained since the last call.
type liveLogs struct {
	api     *apiClient
	offsets map[uint64]int64
	partial map[uint64]string
}

func (l *liveLogs) follow(ctx context.Context, s stepStatus, w io.Writer) {
	if s.State != "running" || s.LeaseID == 0 {
		return
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/api/v1/leases/%d/log?offset=%d", l.api.base, s.LeaseID, l.offsets[s.LeaseID]), nil)
	if err != nil {
		return
	}
	resp, err := l.api.hc.Do(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	l.offsets[s.LeaseID] += int64(len(b))
	text := l.partial[s.LeaseID] + string(b)
	lines := strings.Split(text, "\n")
	l.partial[s.LeaseID] = lines[len(lines)-1]
	name := strings.TrimSuffix(strings.TrimPrefix(s.DrvPath, "/nix/store/")[33:], ".drv")
	for _, line := range lines[:len(lines)-1] {
		fmt.Fprintf(w, "%s> %s\n", name, line)
	}
}

func runBuild(ctx context.Context, f buildFlags, token string, args []string, stdout, stderr io.Writer) error {
	base := strings.TrimRight(f.coordinator, "/")
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	u, err := url.Parse(base)
	if err != nil {
		return fmt.Errorf("--coordinator: %w", err)
	}
	// 1. The derivations: given, or evaluated here.
	drvs := slices.Clone(args)
	if f.file != "" {
		iargs := []string{f.file}
		for _, a := range f.attrs {
			iargs = append(iargs, "-A", a)
		}
		out, err := nixCmd(ctx, f.store, "nix-instantiate", iargs...)
		if err != nil {
			return err
		}
		drvs = append(drvs, strings.Fields(out)...)
	}
	if len(drvs) == 0 {
		return errors.New("nothing to build: give -f FILE [-A ATTR] or .drv paths")
	}
	// 2. Push the .drv closures to the cluster cache; Nix sends the token
	// from a netrc file as Basic auth.
	dir, err := os.MkdirTemp("", "kiln-build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	netrc := filepath.Join(dir, "netrc")
	if err := os.WriteFile(netrc, []byte(fmt.Sprintf("machine %s\nlogin kiln\npassword %s\n", u.Hostname(), token)), 0o600); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "pushing %d derivation(s) and their closure to %s/cache\n", len(drvs), base)
	cargs := append([]string{"--extra-experimental-features", "nix-command", "copy", "--derivation", "--option", "netrc-file", netrc,
		"--to", base + "/cache?compression=zstd"}, drvs...)
	if _, err := nixCmd(ctx, f.store, "nix", cargs...); err != nil {
		return err
	}
	// 3. Submit: one evaluation, or one build per derivation.
	api := &apiClient{base: base, token: token, hc: &http.Client{Timeout: time.Minute}}
	var builds []buildStatus
	if f.eval {
		if builds, err = submitEval(ctx, api, f, drvs, stderr); err != nil {
			return err
		}
	}
	for _, drv := range drvs {
		if f.eval {
			break
		}
		graph, err := graphOf(ctx, f.store, drv)
		if err != nil {
			return err
		}
		job := strings.TrimSuffix(strings.TrimPrefix(drv, "/nix/store/")[33:], ".drv")
		var b buildStatus
		if err := api.do(ctx, http.MethodPost, "/api/v1/builds", map[string]any{
			"drv_path": drv, "graph": graph, "project": f.project, "jobset": f.jobset, "job": job}, &b); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "build %d: %s\n", b.ID, drv)
		builds = append(builds, b)
	}
	// 4. Follow until every build finished, printing running steps' logs.
	last := ""
	logs := &liveLogs{api: api, offsets: map[uint64]int64{}, partial: map[uint64]string{}}
	for {
		done, failed := 0, []buildStatus{}
		counts := map[string]int{}
		for i, b := range builds {
			var cur buildStatus
			if err := api.do(ctx, http.MethodGet, fmt.Sprintf("/api/v1/builds/%d", b.ID), nil, &cur); err != nil {
				return err
			}
			builds[i] = cur
			var steps struct {
				Steps []stepStatus `json:"steps"`
			}
			if err := api.do(ctx, http.MethodGet, fmt.Sprintf("/api/v1/builds/%d/steps", b.ID), nil, &steps); err != nil {
				return err
			}
			for _, s := range steps.Steps {
				counts[s.State]++
				logs.follow(ctx, s, stderr)
			}
			if cur.Finished {
				done++
				if cur.BuildStatus == nil || *cur.BuildStatus != 0 {
					failed = append(failed, cur)
				}
			}
		}
		line := fmt.Sprintf("[%d/%d builds] steps: %d done, %d running, %d queued, %d failed",
			done, len(builds), counts["succeeded"], counts["running"], counts["runnable"]+counts["waiting"], counts["failed"])
		if line != last {
			fmt.Fprintln(stderr, line)
			last = line
		}
		if done == len(builds) {
			if len(failed) > 0 {
				for _, b := range failed {
					reportFailure(ctx, api, b, stderr)
				}
				return fmt.Errorf("%d of %d builds failed", len(failed), len(builds))
			}
			for _, b := range builds {
				names := make([]string, 0, len(b.Outputs))
				for n := range b.Outputs {
					names = append(names, n)
				}
				slices.Sort(names)
				for _, n := range names {
					fmt.Fprintln(stdout, b.Outputs[n])
				}
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up waiting: %w", ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// submitEval records drvs as one evaluation of the jobset. Jobs are named
// by their -A attribute when each attribute gave one derivation, else by
// the derivation's name.
func submitEval(ctx context.Context, api *apiClient, f buildFlags, drvs []string, stderr io.Writer) ([]buildStatus, error) {
	if f.project == "" || f.jobset == "" {
		return nil, errors.New("--eval needs --project and --jobset")
	}
	start := time.Now()
	var jobs []map[string]any
	for i, drv := range drvs {
		graph, err := graphOf(ctx, f.store, drv)
		if err != nil {
			return nil, err
		}
		job := strings.TrimSuffix(strings.TrimPrefix(drv, "/nix/store/")[33:], ".drv")
		if len(f.attrs) == len(drvs) {
			job = f.attrs[i]
		}
		jobs = append(jobs, map[string]any{"job": job, "drv_path": drv, "graph": graph})
	}
	var ev struct {
		ID     uint64   `json:"id"`
		Builds []uint64 `json:"builds"`
	}
	path := "/api/v1/projects/" + url.PathEscape(f.project) + "/jobsets/" + url.PathEscape(f.jobset) + "/evaluations"
	if err := api.do(ctx, http.MethodPost, path, map[string]any{"eval_time": int64(time.Since(start).Seconds()), "jobs": jobs}, &ev); err != nil {
		return nil, err
	}
	fmt.Fprintf(stderr, "evaluation %d of %s:%s: %d builds\n", ev.ID, f.project, f.jobset, len(ev.Builds))
	out := make([]buildStatus, len(ev.Builds))
	for i, id := range ev.Builds {
		out[i].ID = id
	}
	return out, nil
}

// reportFailure prints the failing steps of a build and the tail of their logs.
func reportFailure(ctx context.Context, api *apiClient, b buildStatus, w io.Writer) {
	fmt.Fprintf(w, "build %d (%s) %s\n", b.ID, b.DrvPath, b.Status)
	var steps struct {
		Steps []stepStatus `json:"steps"`
	}
	if err := api.do(ctx, http.MethodGet, fmt.Sprintf("/api/v1/builds/%d/steps", b.ID), nil, &steps); err != nil {
		fmt.Fprintln(w, "  (steps unavailable:", err, ")")
		return
	}
	for _, s := range steps.Steps {
		if s.State != "failed" || (s.BuildStatus != nil && *s.BuildStatus == 2) {
			continue
		}
		fmt.Fprintf(w, "failed step %s: %s\n", s.DrvPath, s.LastError)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, api.base+"/cache/log/"+strings.TrimPrefix(s.DrvPath, "/nix/store/"), nil)
		if err != nil {
			continue
		}
		resp, err := api.hc.Do(req)
		if err != nil {
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(body), "\n"), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		fmt.Fprintln(w, "last log lines:")
		for _, l := range lines {
			fmt.Fprintln(w, "> "+l)
		}
	}
}
