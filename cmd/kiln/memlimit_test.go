package main

import (
	"math"
	"os"
	"path/filepath"
	"testing"
)

func TestMemoryLimit(t *testing.T) {
	cgroup := func(files map[string]string) string {
		dir := t.TempDir()
		for name, v := range files {
			p := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	noEnv := func(string) string { return "" }
	tests := []struct {
		name    string
		spec    string
		root    string
		env     func(string) string
		want    int64
		wantOK  bool
		wantErr bool
	}{
		{"explicit MiB", "900MiB", cgroup(nil), noEnv, 900 << 20, true, false},
		{"explicit GiB with space", "2 GiB", cgroup(nil), noEnv, 2 << 30, true, false},
		{"explicit MB", "1500MB", cgroup(nil), noEnv, 1500e6, true, false},
		{"bytes", "123456789", cgroup(nil), noEnv, 123456789, true, false},
		{"none", "none", cgroup(nil), noEnv, math.MaxInt64, true, false},
		{"zero is none", "0", cgroup(nil), noEnv, math.MaxInt64, true, false},
		{"auto, cgroup v2 limit", "auto", cgroup(map[string]string{"memory.max": "2147483648\n"}), noEnv, 2147483648 / 10 * 9, true, false},
		{"auto, cgroup v2 unlimited", "auto", cgroup(map[string]string{"memory.max": "max\n"}), noEnv, 0, false, false},
		{"auto, cgroup v1 limit", "auto", cgroup(map[string]string{"memory/memory.limit_in_bytes": "1073741824\n"}), noEnv, 1073741824 / 10 * 9, true, false},
		{"auto, cgroup v1 unlimited", "auto", cgroup(map[string]string{"memory/memory.limit_in_bytes": "9223372036854771712\n"}), noEnv, 0, false, false},
		{"auto, no cgroup files", "auto", cgroup(nil), noEnv, 0, false, false},
		{"auto defers to GOMEMLIMIT", "auto", cgroup(map[string]string{"memory.max": "2147483648"}), func(k string) string {
			if k == "GOMEMLIMIT" {
				return "1GiB"
			}
			return ""
		}, 0, false, false},
		{"auto, garbage in cgroup", "auto", cgroup(map[string]string{"memory.max": "lots"}), noEnv, 0, false, true},
		{"negative", "-5MiB", cgroup(nil), noEnv, 0, false, true},
		{"unknown unit", "5 parsecs", cgroup(nil), noEnv, 0, false, true},
		{"overflow", "9999999999TiB", cgroup(nil), noEnv, 0, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok, err := memoryLimit(tt.spec, tt.root, tt.env)
			if (err != nil) != tt.wantErr || ok != tt.wantOK || got != tt.want {
				t.Errorf("memoryLimit(%q) = %d, %v, %v; want %d, %v, error %v", tt.spec, got, ok, err, tt.want, tt.wantOK, tt.wantErr)
			}
		})
	}
}
