package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/cobra"
)

type testFlags struct {
	Addr    string
	Jobs    int
	Boot    bool
	Timeout time.Duration
	Join    []string
	Nested  time.Duration
}

func newTestCmd(f *testFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "coordinator"}
	fl := cmd.Flags()
	fl.String("config", "", "")
	fl.StringVar(&f.Addr, "http-addr", ":8080", "")
	fl.IntVar(&f.Jobs, "max-jobs", 1, "")
	fl.BoolVar(&f.Boot, "bootstrap", false, "")
	fl.DurationVar(&f.Timeout, "timeout", time.Second, "")
	fl.StringSliceVar(&f.Join, "join", nil, "")
	fl.DurationVar(&f.Nested, "raft-heartbeat-timeout", 0, "")
	return cmd
}

func TestConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.toml", `
[coordinator]
http-addr = "file:1"
max_jobs = 4
bootstrap = true
join = ["a:1", "b:2"]
[coordinator.raft]
heartbeat-timeout = "250ms"
[agent]
whatever = 1
`)
	unknown := write("unknown.toml", "[coordinator]\nno-such-flag = 1\n")
	badValue := write("bad.toml", "[coordinator]\nmax-jobs = \"abc\"\n")
	malformed := write("malformed.toml", "[coordinator\nx=")
	defaults := testFlags{Addr: ":8080", Jobs: 1, Timeout: time.Second}

	cases := []struct {
		name    string
		args    []string
		env     map[string]string
		want    testFlags
		wantErr string
	}{
		{name: "defaults only", want: defaults},
		{name: "file only", args: []string{"--config", good},
			want: testFlags{Addr: "file:1", Jobs: 4, Boot: true, Timeout: time.Second, Join: []string{"a:1", "b:2"}, Nested: 250 * time.Millisecond}},
		{name: "file via KILN_CONFIG", env: map[string]string{"KILN_CONFIG": good},
			want: testFlags{Addr: "file:1", Jobs: 4, Boot: true, Timeout: time.Second, Join: []string{"a:1", "b:2"}, Nested: 250 * time.Millisecond}},
		{name: "env over file", args: []string{"--config", good}, env: map[string]string{"KILN_COORDINATOR__HTTP_ADDR": "env:2", "KILN_MAX_JOBS": "7"},
			want: testFlags{Addr: "env:2", Jobs: 7, Boot: true, Timeout: time.Second, Join: []string{"a:1", "b:2"}, Nested: 250 * time.Millisecond}},
		{name: "nested env name wins over un-nested", env: map[string]string{"KILN_COORDINATOR__HTTP_ADDR": "nested", "KILN_HTTP_ADDR": "flat"},
			want: testFlags{Addr: "nested", Jobs: 1, Timeout: time.Second}},
		{name: "flag over env", args: []string{"--http-addr", "flag:3", "--config", good}, env: map[string]string{"KILN_COORDINATOR__HTTP_ADDR": "env:2"},
			want: testFlags{Addr: "flag:3", Jobs: 4, Boot: true, Timeout: time.Second, Join: []string{"a:1", "b:2"}, Nested: 250 * time.Millisecond}},
		{name: "nested env", env: map[string]string{"KILN_COORDINATOR__RAFT_HEARTBEAT_TIMEOUT": "1s", "KILN_JOIN": "x:1,y:2"},
			want: testFlags{Addr: ":8080", Jobs: 1, Timeout: time.Second, Nested: time.Second, Join: []string{"x:1", "y:2"}}},
		{name: "unknown key", args: []string{"--config", unknown}, wantErr: `unknown key "no-such-flag"`},
		{name: "bad value names the file and key", args: []string{"--config", badValue}, wantErr: "bad.toml: key max-jobs"},
		{name: "bad env value names the variable", env: map[string]string{"KILN_MAX_JOBS": "abc"}, wantErr: "KILN_MAX_JOBS"},
		{name: "malformed file", args: []string{"--config", malformed}, wantErr: "malformed.toml"},
		{name: "missing file", args: []string{"--config", filepath.Join(dir, "nope.toml")}, wantErr: "nope.toml"},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			var got testFlags
			cmd := newTestCmd(&got)
			if err := cmd.ParseFlags(tt.args); err != nil {
				t.Fatal(err)
			}
			err := applyConfig(cmd, func(k string) (string, bool) { v, ok := tt.env[k]; return v, ok })
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Fatalf("flags (-want +got):\n%s", diff)
			}
		})
	}
}
