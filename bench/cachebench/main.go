// Command cachebench compares Kiln's binary cache with nginx serving a
// static Nix binary cache of the same store paths, in the same run, with
// load from wrk.
//
// It builds kiln, builds a small and a large (~64 MiB, incompressible)
// store path with real Nix in a chroot store, pushes both to `kiln dev`
// with `nix copy` and copies them to a file:// cache that nginx serves,
// checks both caches serve the same paths, then runs wrk against each,
// kiln and nginx interleaved and repeated, and reports the medians:
//
//	narinfo GETs/s at 1 and 64 connections
//	NAR download MiB/s at 1 and 16 connections
//
// with the ratio kiln/nginx. Run it from the repository root:
//
//	go run ./bench/cachebench [-duration 5s] [-reps 3]
//
// BENCH_DURATION, BENCH_REPS, BENCH_LARGE_MIB and BENCH_PIN set the
// defaults of the flags.
//
// The c=1 runs are pinned (-pin same, the default): wrk and the server
// share CPU 0. Unpinned, a ping-pong over loopback is bimodal on a small VM:
// when client and server sit on different vCPUs every request waits for an
// idle vCPU to wake (~70 µs on Firecracker), and which case a run gets is
// luck. Sharing one CPU measures the server's cost per request instead;
// -pin split (server on CPU 0, wrk on CPU 1) measures the wake-up path,
// -pin none leaves placement to the scheduler. Runs with more connections
// are never pinned: wrk and the server need both CPUs.
//
// A missed target is reported, not an error: the exit status is non-zero
// only when the setup fails.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kilnci/kiln/internal/freeport"
)

func main() {
	defaultDuration := 5 * time.Second
	if v := os.Getenv("BENCH_DURATION"); v != "" {
		d, err := parseDuration(v)
		if err != nil {
			fatalf("BENCH_DURATION=%q: %v", v, err)
		}
		defaultDuration = d
	}
	duration := flag.Duration("duration", defaultDuration, "length of each wrk run (env BENCH_DURATION; whole seconds)")
	reps := flag.Int("reps", envInt("BENCH_REPS", 3), "kiln/nginx pairs per figure; the median is reported (env BENCH_REPS)")
	largeMiB := flag.Int("large-mib", envInt("BENCH_LARGE_MIB", 64), "size of the large store path in MiB (env BENCH_LARGE_MIB)")
	warmup := flag.Duration("warmup", time.Second, "unreported wrk run against each server and URL before measuring (0: none)")
	keep := flag.Bool("keep", false, "keep the work directory (stores, caches, logs)")
	pin := flag.String("pin", envString("BENCH_PIN", "same"), "CPU placement of the c=1 runs: same (wrk and server on CPU 0), split (server CPU 0, wrk CPU 1) or none (env BENCH_PIN)")
	flag.Parse()
	if *reps < 1 {
		fatalf("-reps must be at least 1")
	}
	if *pin != "same" && *pin != "split" && *pin != "none" {
		fatalf("-pin %q: want same, split or none", *pin)
	}
	if *duration < time.Second {
		fatalf("-duration must be at least 1s (wrk takes whole seconds)")
	}

	b := &bench{duration: *duration, reps: *reps, largeMiB: *largeMiB, warmup: *warmup, pin: *pin}
	// SIGINT/SIGTERM: stop the servers before going.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "cachebench: %v, stopping\n", s)
		b.cleanup(*keep)
		os.Exit(2)
	}()
	err := b.run()
	b.cleanup(*keep)
	if err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cachebench: "+format+"\n", args...)
	os.Exit(1)
}

func envString(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func envInt(name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

// parseDuration accepts a Go duration or a bare number of seconds.
func parseDuration(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(s)
}

type bench struct {
	duration time.Duration
	reps     int
	largeMiB int
	warmup   time.Duration
	pin      string

	dir   string
	kiln  *server
	nginx *server
	nixN  int
}

// server is a process under test and where its cache is.
type server struct {
	name    string
	cmd     *exec.Cmd
	done    chan struct{}
	logPath string
	base    string // http://127.0.0.1:port/cache
}

func (s *server) alive() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM (nginx: fast shutdown; kiln: graceful close) and
// SIGKILL after a grace period.
func (s *server) stop() {
	if s == nil || s.cmd == nil || s.cmd.Process == nil {
		return
	}
	if !s.alive() {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		fmt.Fprintf(os.Stderr, "cachebench: %s did not stop on SIGTERM, killing it\n", s.name)
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

func (b *bench) cleanup(keep bool) {
	b.nginx.stop()
	b.kiln.stop()
	if b.dir == "" {
		return
	}
	if keep {
		fmt.Fprintf(os.Stderr, "cachebench: work directory kept: %s\n", b.dir)
		return
	}
	// Store paths are read-only; make them writable so they can go.
	_ = filepath.WalkDir(b.dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o755)
		}
		return nil
	})
	if err := os.RemoveAll(b.dir); err != nil {
		fmt.Fprintf(os.Stderr, "cachebench: removing %s: %v\n", b.dir, err)
	}
}

func logf(format string, args ...any) {
	fmt.Printf("# "+format+"\n", args...)
}

func (b *bench) run() error {
	for _, bin := range []string{"nix", "nix-build", "wrk"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s not found: apt-get install -y nix-bin wrk nginx-light busybox-static (or make bench-cache)", bin)
		}
	}
	nginxBin, err := lookNginx()
	if err != nil {
		return err
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		return errors.New("/bin/busybox not found: apt-get install -y busybox-static")
	}
	if runtime.NumCPU() < 2 {
		b.pin = "none"
	}
	if b.pin != "none" {
		if _, err := exec.LookPath("taskset"); err != nil {
			return errors.New("taskset not found (util-linux); or run with -pin none")
		}
	}
	if _, err := os.Stat("go.mod"); err != nil {
		return errors.New("run from the repository root (go run ./bench/cachebench)")
	}
	b.dir, err = os.MkdirTemp("", "kiln-cachebench-")
	if err != nil {
		return err
	}
	logf("work dir %s, %d CPUs, wrk runs of %s, %d kiln/nginx pairs per figure, c=1 runs pinned: %s; load average %s", b.dir, runtime.NumCPU(), b.duration, b.reps, b.pin, loadAvg())

	// 1. kiln binary.
	kilnBin := filepath.Join(b.dir, "kiln")
	gocmd := os.Getenv("GO")
	if gocmd == "" {
		gocmd = "go"
	}
	if out, err := exec.Command(gocmd, "build", "-o", kilnBin, "./cmd/kiln").CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/kiln: %v\n%s", err, out)
	}
	logf("built %s", kilnBin)

	// 2. store paths.
	small, large, err := b.buildPaths()
	if err != nil {
		return err
	}
	paths := []string{small, large}
	logf("built %s and %s (%d MiB blob)", small, large, b.largeMiB)

	// 3. kiln, and the push.
	if err := b.startKiln(kilnBin); err != nil {
		return err
	}
	tok, err := os.ReadFile(filepath.Join(b.dir, "kiln-data", "admin-token"))
	if err != nil {
		return fmt.Errorf("kiln admin token: %w", err)
	}
	netrc := filepath.Join(b.dir, "netrc")
	if err := os.WriteFile(netrc, []byte("machine 127.0.0.1\nlogin kiln\npassword "+strings.TrimSpace(string(tok))+"\n"), 0o600); err != nil {
		return err
	}
	t0 := time.Now()
	if _, err := b.nix("nix", append([]string{"copy", "--store", b.store(), "--option", "substituters", "", "--option", "netrc-file", netrc,
		"--to", b.kiln.base + "?compression=zstd"}, paths...)...); err != nil {
		return fmt.Errorf("push to kiln: %w", err)
	}
	logf("nix copy to kiln took %s", time.Since(t0).Round(time.Millisecond))

	// 4. the static cache and nginx.
	fileCache := filepath.Join(b.dir, "filecache")
	t0 = time.Now()
	if _, err := b.nix("nix", append([]string{"copy", "--store", b.store(), "--option", "substituters", "",
		"--to", "file://" + fileCache + "?compression=zstd"}, paths...)...); err != nil {
		return fmt.Errorf("copy to the file cache: %w", err)
	}
	logf("nix copy to file://%s took %s", fileCache, time.Since(t0).Round(time.Millisecond))
	if err := b.startNginx(nginxBin, fileCache); err != nil {
		return err
	}

	// 5. same paths on both.
	if _, err := b.compare(small); err != nil {
		return err
	}
	largeInfo, err := b.compare(large)
	if err != nil {
		return err
	}

	// 6. load.
	scenarios := []scenario{
		{name: "narinfo c=1", threads: 1, conns: 1, path: hashPart(small) + ".narinfo", metric: reqPerSec, target: 1.0},
		{name: "narinfo c=64", threads: 2, conns: 64, path: hashPart(small) + ".narinfo", metric: reqPerSec, target: 1.0},
		{name: "NAR c=1", threads: 1, conns: 1, nar: largeInfo, metric: mibPerSec, target: 0.9},
		{name: "NAR c=16", threads: 2, conns: 16, nar: largeInfo, metric: mibPerSec, target: 0.9},
	}
	script := filepath.Join(b.dir, "report.lua")
	if err := os.WriteFile(script, []byte(wrkScript), 0o644); err != nil {
		return err
	}
	for i := range scenarios {
		if err := b.runScenario(&scenarios[i], script); err != nil {
			return err
		}
	}
	b.report(scenarios, largeInfo)
	return nil
}

// loadAvg is the 1/5/15-minute load average: other work on the machine
// skews the figures (the interleaving spreads it over kiln and nginx).
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func lookNginx() (string, error) {
	if p, err := exec.LookPath("nginx"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/nginx"); err == nil {
		return "/usr/sbin/nginx", nil
	}
	return "", errors.New("nginx not found: apt-get install -y nginx-light")
}

func (b *bench) store() string { return filepath.Join(b.dir, "s1") }

// nix runs a Nix command with its own XDG cache dir (Nix would otherwise
// remember narinfo lookups between calls) and returns its stdout.
func (b *bench) nix(name string, args ...string) (string, error) {
	b.nixN++
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(),
		"XDG_CACHE_HOME="+filepath.Join(b.dir, fmt.Sprintf("xdg-%d", b.nixN)),
		"NIX_CONFIG=experimental-features = nix-command")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

// nixExpr has a small path (a few files) and a large one: LARGE MiB of
// random bytes, from /dev/urandom where the sandbox has it (Linux Nix
// does), else from busybox awk (slower, and zstd gets some of it back).
const nixExpr = `{ nonce }: {
  small = derivation {
    name = "cachebench-small";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    inherit nonce;
    args = [ "-c" "mkdir -p $out/share/doc $out/bin && echo $nonce > $out/share/doc/nonce && echo 'a small store path' > $out/share/doc/README && printf '#!/bin/sh\\necho hi\\n' > $out/bin/hello && chmod +x $out/bin/hello && ln -s bin/hello $out/run" ];
  };
  large = derivation {
    name = "cachebench-large";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    inherit nonce;
    args = [ "-c" "mkdir -p $out && echo $nonce > $out/nonce && if head -c 1 /dev/urandom >/dev/null 2>&1; then head -c $((LARGE * 1048576)) /dev/urandom > $out/blob; else awk -v n=$((LARGE * 1048576 / 16)) 'BEGIN { srand(); for (i = 0; i < n; i++) printf \"%08x%08x\", int(rand() * 4294967296), int(rand() * 4294967296) }' > $out/blob; fi && test $(wc -c < $out/blob) -eq $((LARGE * 1048576))" ];
  };
}`

func (b *bench) buildPaths() (small, large string, err error) {
	file := filepath.Join(b.dir, "default.nix")
	expr := strings.ReplaceAll(nixExpr, "LARGE", strconv.Itoa(b.largeMiB))
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		return "", "", err
	}
	out, err := b.nix("nix-build", "--store", b.store(), "--option", "substituters", "",
		"--option", "sandbox-paths", "/bin/sh=/bin/busybox", "--no-out-link",
		"--argstr", "nonce", strconv.FormatInt(time.Now().UnixNano(), 10),
		"-A", "small", "-A", "large", file)
	if err != nil {
		return "", "", fmt.Errorf("nix-build: %w", err)
	}
	f := strings.Fields(out)
	if len(f) != 2 {
		return "", "", fmt.Errorf("nix-build printed %q, want two store paths", out)
	}
	return f[0], f[1], nil
}

// freePort picks a loopback port that was free a moment ago and that this
// run has not picked before (freeport).
func freePort() (int, error) {
	addr, err := freeport.Loopback(false)
	if err != nil {
		return 0, err
	}
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(p)
}

func (b *bench) startProcess(name, logName string, bin string, args ...string) (*server, error) {
	s := &server{name: name, done: make(chan struct{}), logPath: filepath.Join(b.dir, logName)}
	logFile, err := os.Create(s.logPath)
	if err != nil {
		return nil, err
	}
	s.cmd = exec.Command(bin, args...)
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	// Should this program die without cleaning up, so does the server.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := s.cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		_ = s.cmd.Wait()
		logFile.Close()
		close(s.done)
	}()
	return s, nil
}

func (s *server) logTail() string {
	b, _ := os.ReadFile(s.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// waitHTTP polls url until it answers 200 (or the process exits).
func waitHTTP(s *server, url string, within time.Duration) error {
	deadline := time.Now().Add(within)
	var last string
	for time.Now().Before(deadline) {
		if !s.alive() {
			return fmt.Errorf("%s exited: %v\n%s", s.name, s.cmd.ProcessState, s.logTail())
		}
		resp, err := http.Get(url)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("status %d: %s", resp.StatusCode, bytes.TrimSpace(body))
		} else {
			last = err.Error()
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s: GET %s not 200 within %s (last: %s)\n%s", s.name, url, within, last, s.logTail())
}

func (b *bench) startKiln(bin string) error {
	httpPort, err := freePort()
	if err != nil {
		return err
	}
	raftPort, err := freePort()
	if err != nil {
		return err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", httpPort)
	b.kiln, err = b.startProcess("kiln", "kiln.log", bin, "dev",
		"--data-dir", filepath.Join(b.dir, "kiln-data"),
		"--http-addr", addr,
		"--raft-addr", fmt.Sprintf("127.0.0.1:%d", raftPort),
		"--log-level", "warn")
	if err != nil {
		return err
	}
	b.kiln.base = "http://" + addr + "/cache"
	if err := waitHTTP(b.kiln, "http://"+addr+"/ready", 60*time.Second); err != nil {
		return err
	}
	logf("kiln dev ready on %s (pid %d)", addr, b.kiln.cmd.Process.Pid)
	return nil
}

const nginxConf = `# cachebench: nginx serving a static Nix binary cache.
daemon off;
master_process on;
worker_processes auto;
pid {{PREFIX}}/nginx.pid;
error_log {{PREFIX}}/error.log warn;
{{USER}}
events {
    worker_connections 1024;
}
http {
    access_log off;
    client_body_temp_path {{PREFIX}}/client_body;
    proxy_temp_path {{PREFIX}}/proxy;
    fastcgi_temp_path {{PREFIX}}/fastcgi;
    uwsgi_temp_path {{PREFIX}}/uwsgi;
    scgi_temp_path {{PREFIX}}/scgi;
    types {
        text/x-nix-narinfo narinfo;
        text/x-nix-cache-info nix-cache-info;
        application/x-nix-nar zst nar xz;
    }
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:{{PORT}} reuseport;
        location /cache/ {
            alias {{ROOT}}/;
        }
    }
}
`

func (b *bench) startNginx(bin, root string) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	prefix := filepath.Join(b.dir, "nginx")
	if err := os.MkdirAll(prefix, 0o755); err != nil {
		return err
	}
	user := ""
	if os.Geteuid() == 0 {
		// Workers would otherwise run as nobody, who cannot read the
		// 0700 temp dir.
		user = "user root root;"
	}
	conf := strings.NewReplacer("{{PREFIX}}", prefix, "{{PORT}}", strconv.Itoa(port), "{{ROOT}}", root, "{{USER}}", user).Replace(nginxConf)
	confPath := filepath.Join(prefix, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return err
	}
	if out, err := exec.Command(bin, "-t", "-c", confPath, "-p", prefix).CombinedOutput(); err != nil {
		return fmt.Errorf("nginx -t: %v\n%s", err, out)
	}
	b.nginx, err = b.startProcess("nginx", "nginx.out", bin, "-c", confPath, "-p", prefix)
	if err != nil {
		return err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	b.nginx.base = "http://" + addr + "/cache"
	if err := waitHTTP(b.nginx, b.nginx.base+"/nix-cache-info", 20*time.Second); err != nil {
		return err
	}
	logf("nginx ready on %s (pid %d, config %s)", addr, b.nginx.cmd.Process.Pid, confPath)
	return nil
}

func hashPart(storePath string) string {
	base := filepath.Base(storePath)
	if len(base) < 32 {
		return base
	}
	return base[:32]
}

// narInfo is what the benchmark needs of a narinfo, for each server.
type narInfo struct {
	storePath, narHash, narSize string
	url                         map[string]string // server name -> URL field
	fileSize                    map[string]int64
}

func getNarInfo(base, hp string) (map[string]string, error) {
	resp, err := http.Get(base + "/" + hp + ".narinfo")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/%s.narinfo: status %d: %s", base, hp, resp.StatusCode, bytes.TrimSpace(body))
	}
	m := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ": "); ok {
			m[k] = v
		}
	}
	return m, nil
}

// compare checks kiln and nginx serve the same path and that both NAR
// URLs answer 200 with FileSize bytes.
func (b *bench) compare(storePath string) (*narInfo, error) {
	hp := hashPart(storePath)
	ni := &narInfo{storePath: storePath, url: map[string]string{}, fileSize: map[string]int64{}}
	var first map[string]string
	for _, s := range []*server{b.kiln, b.nginx} {
		m, err := getNarInfo(s.base, hp)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
		if m["StorePath"] != storePath {
			return nil, fmt.Errorf("%s: %s.narinfo has StorePath %q, want %q", s.name, hp, m["StorePath"], storePath)
		}
		if m["Compression"] != "zstd" {
			return nil, fmt.Errorf("%s: %s.narinfo has Compression %q, want zstd", s.name, hp, m["Compression"])
		}
		if first == nil {
			first = m
		} else if m["NarHash"] != first["NarHash"] || m["NarSize"] != first["NarSize"] {
			return nil, fmt.Errorf("%s.narinfo: NarHash/NarSize differ: kiln %s %s, nginx %s %s", hp, first["NarHash"], first["NarSize"], m["NarHash"], m["NarSize"])
		}
		fs, err := strconv.ParseInt(m["FileSize"], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: %s.narinfo FileSize %q: %v", s.name, hp, m["FileSize"], err)
		}
		ni.url[s.name], ni.fileSize[s.name] = m["URL"], fs
		resp, err := http.Get(s.base + "/" + m["URL"])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: GET %s: %w", s.name, m["URL"], err)
		}
		if resp.StatusCode != http.StatusOK || n != fs {
			return nil, fmt.Errorf("%s: GET %s/%s: status %d, %d bytes, want 200 and FileSize %d", s.name, s.base, m["URL"], resp.StatusCode, n, fs)
		}
	}
	ni.narHash, ni.narSize = first["NarHash"], first["NarSize"]
	same := "same compressed file"
	if ni.url["kiln"] != ni.url["nginx"] {
		same = "DIFFERENT compressed files"
	}
	logf("%s: narinfo and NAR OK on both; NarSize %s, FileSize kiln %d nginx %d (%s)", hp, ni.narSize, ni.fileSize["kiln"], ni.fileSize["nginx"], same)
	return ni, nil
}

type metric int

const (
	reqPerSec metric = iota
	mibPerSec
)

type scenario struct {
	name           string
	threads, conns int
	path           string   // narinfo: relative to the cache root
	nar            *narInfo // NAR: the URL differs per server
	metric         metric
	target         float64
	runs           map[string][]wrkResult
}

func (sc *scenario) url(s *server) string {
	if sc.nar != nil {
		return s.base + "/" + sc.nar.url[s.name]
	}
	return s.base + "/" + sc.path
}

func (sc *scenario) value(r wrkResult) float64 {
	if sc.metric == mibPerSec {
		return r.bytesPerSec / (1 << 20)
	}
	return r.reqPerSec
}

func (sc *scenario) unit() string {
	if sc.metric == mibPerSec {
		return "MiB/s"
	}
	return "req/s"
}

// wrkScript makes wrk print exact totals (its human output rounds).
const wrkScript = `done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("CACHEBENCH requests=%d bytes=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
`

type wrkResult struct {
	reqPerSec, bytesPerSec float64
	// from wrk's human-readable lines, as a cross-check
	humanReqPerSec, humanBytesPerSec float64
	requests, bytes                  int64
	errors                           int64
	p50, p99                         time.Duration
	serverCPU                        float64 // CPU seconds the server used per wall second
}

func (b *bench) wrk(sc *scenario, s *server, script string, d time.Duration) (wrkResult, error) {
	secs := int((d + time.Second/2) / time.Second)
	if secs < 1 {
		secs = 1
	}
	args := []string{"-t", strconv.Itoa(sc.threads), "-c", strconv.Itoa(sc.conns), "-d", fmt.Sprintf("%ds", secs),
		"--timeout", "30s", "--latency", "-s", script, sc.url(s)}
	name := "wrk"
	if cpus := b.wrkCPUs(sc); cpus != "" {
		args = append([]string{"-c", cpus, "wrk"}, args...)
		name = "taskset"
	}
	cpu0 := treeCPU(s.cmd.Process.Pid)
	t0 := time.Now()
	out, err := exec.Command(name, args...).CombinedOutput()
	wall := time.Since(t0).Seconds()
	cpu1 := treeCPU(s.cmd.Process.Pid)
	if err != nil {
		return wrkResult{}, fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	if !s.alive() {
		return wrkResult{}, fmt.Errorf("%s exited during wrk:\n%s", s.name, s.logTail())
	}
	r, err := parseWrk(string(out))
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if r.errors > 0 || strings.Contains(string(out), "Non-2xx") {
		return wrkResult{}, fmt.Errorf("wrk against %s saw errors (bad setup?):\n%s", s.name, out)
	}
	if cpu0 >= 0 && cpu1 >= 0 {
		r.serverCPU = (cpu1 - cpu0) / wall
	}
	return r, nil
}

// parseWrk reads wrk's output: the exact CACHEBENCH line of the script,
// and the "Requests/sec:" and "Transfer/sec:" lines.
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	var got bool
	var durUS, connect, read, write, status, timeout, p50, p99 int64
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "CACHEBENCH "):
			if _, err := fmt.Sscanf(line, "CACHEBENCH requests=%d bytes=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d",
				&r.requests, &r.bytes, &durUS, &connect, &read, &write, &status, &timeout, &p50, &p99); err != nil {
				return r, fmt.Errorf("parsing %q: %v", line, err)
			}
			got = true
		case strings.HasPrefix(line, "Requests/sec:"):
			v, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(line, "Requests/sec:")), 64)
			if err != nil {
				return r, fmt.Errorf("parsing %q: %v", line, err)
			}
			r.humanReqPerSec = v
		case strings.HasPrefix(line, "Transfer/sec:"):
			v, err := parseBytes(strings.TrimSpace(strings.TrimPrefix(line, "Transfer/sec:")))
			if err != nil {
				return r, fmt.Errorf("parsing %q: %v", line, err)
			}
			r.humanBytesPerSec = v
		}
	}
	if r.humanReqPerSec == 0 && r.humanBytesPerSec == 0 {
		return r, errors.New("no Requests/sec or Transfer/sec in wrk output")
	}
	if got && durUS > 0 {
		r.reqPerSec = float64(r.requests) / (float64(durUS) / 1e6)
		r.bytesPerSec = float64(r.bytes) / (float64(durUS) / 1e6)
		r.errors = connect + read + write + status + timeout
		r.p50, r.p99 = time.Duration(p50)*time.Microsecond, time.Duration(p99)*time.Microsecond
	} else {
		r.reqPerSec, r.bytesPerSec = r.humanReqPerSec, r.humanBytesPerSec
	}
	return r, nil
}

// parseBytes reads wrk's sizes: "512.00B", "3.21KB", "1.05GB" (binary units).
func parseBytes(s string) (float64, error) {
	units := []struct {
		suffix string
		mult   float64
	}{{"TB", 1 << 40}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"KB", 1 << 10}, {"B", 1}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(num, 64)
			if err != nil {
				return 0, err
			}
			return v * u.mult, nil
		}
	}
	return 0, fmt.Errorf("unknown unit in %q", s)
}

// treeCPU is the user+system CPU seconds of pid and its children (nginx's
// workers), from /proc; -1 if unreadable.
func treeCPU(pid int) float64 {
	ticks := 100.0 // USER_HZ on Linux
	read := func(p string) (ppid int, cpu float64, ok bool) {
		b, err := os.ReadFile(filepath.Join("/proc", p, "stat"))
		if err != nil {
			return 0, 0, false
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			return 0, 0, false
		}
		f := strings.Fields(s[i+1:])
		// f[0] state, f[1] ppid, ..., f[11] utime, f[12] stime
		if len(f) < 13 {
			return 0, 0, false
		}
		pp, _ := strconv.Atoi(f[1])
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		return pp, (ut + st) / ticks, true
	}
	_, total, ok := read(strconv.Itoa(pid))
	if !ok {
		return -1
	}
	for _, c := range children(pid) {
		if _, cpu, ok := read(strconv.Itoa(c)); ok {
			total += cpu
		}
	}
	return total
}

// children lists the processes whose parent is pid.
func children(pid int) []int {
	var out []int
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	for _, e := range ents {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			if n, err := strconv.Atoi(e.Name()); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// pinned reports whether sc's runs are pinned to CPUs.
func (b *bench) pinned(sc *scenario) bool { return b.pin != "none" && sc.conns == 1 }

// wrkCPUs is the CPU list wrk runs on for sc ("": anywhere).
func (b *bench) wrkCPUs(sc *scenario) string {
	if !b.pinned(sc) {
		return ""
	}
	if b.pin == "split" {
		return "1"
	}
	return "0"
}

// setAffinity moves every thread of the servers' process trees (kiln, and
// nginx's master and workers) to cpus.
func (b *bench) setAffinity(cpus string) error {
	for _, s := range []*server{b.kiln, b.nginx} {
		pid := s.cmd.Process.Pid
		for _, p := range append([]int{pid}, children(pid)...) {
			if out, err := exec.Command("taskset", "-a", "-c", "-p", cpus, strconv.Itoa(p)).CombinedOutput(); err != nil {
				return fmt.Errorf("taskset -a -c -p %s %d (%s): %v\n%s", cpus, p, s.name, err, out)
			}
		}
	}
	return nil
}

func (b *bench) runScenario(sc *scenario, script string) error {
	sc.runs = map[string][]wrkResult{}
	servers := []*server{b.kiln, b.nginx}
	if b.pinned(sc) {
		if err := b.setAffinity("0"); err != nil {
			return err
		}
		defer func() {
			if err := b.setAffinity(fmt.Sprintf("0-%d", runtime.NumCPU()-1)); err != nil {
				fmt.Fprintf(os.Stderr, "cachebench: %v\n", err)
			}
		}()
		fmt.Printf("  %s: servers on CPU 0, wrk on CPU %s\n", sc.name, b.wrkCPUs(sc))
	}
	if b.warmup > 0 {
		for _, s := range servers {
			if _, err := b.wrk(sc, s, script, b.warmup); err != nil {
				return fmt.Errorf("%s warm-up: %w", sc.name, err)
			}
		}
	}
	for rep := range b.reps {
		order := servers
		if rep%2 == 1 { // alternate who goes first
			order = []*server{b.nginx, b.kiln}
		}
		for _, s := range order {
			r, err := b.wrk(sc, s, script, b.duration)
			if err != nil {
				return fmt.Errorf("%s: %w", sc.name, err)
			}
			sc.runs[s.name] = append(sc.runs[s.name], r)
			fmt.Printf("  %-13s %-5s run %d: %10.1f %s  p50 %-9s p99 %-9s server CPU %.2f cores  (wrk: %.2f req/s, %s/s)\n",
				sc.name, s.name, rep+1, sc.value(r), sc.unit(), r.p50, r.p99, r.serverCPU, r.humanReqPerSec, fmtBytes(r.humanBytesPerSec))
		}
	}
	return nil
}

func fmtBytes(v float64) string {
	switch {
	case v >= 1<<30:
		return fmt.Sprintf("%.2fGiB", v/(1<<30))
	case v >= 1<<20:
		return fmt.Sprintf("%.2fMiB", v/(1<<20))
	case v >= 1<<10:
		return fmt.Sprintf("%.2fKiB", v/(1<<10))
	}
	return fmt.Sprintf("%.0fB", v)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

type summary struct {
	kiln, nginx, ratio      float64
	pairMin, pairMax        float64
	kilnCPU, nginxCPU       float64
	kilnP50, nginxP50       time.Duration
	kilnValues, nginxValues []float64
}

func (sc *scenario) summarize() summary {
	var s summary
	var kc, nc, kp, np []float64
	for i, r := range sc.runs["kiln"] {
		n := sc.runs["nginx"][i]
		s.kilnValues = append(s.kilnValues, sc.value(r))
		s.nginxValues = append(s.nginxValues, sc.value(n))
		kc, nc = append(kc, r.serverCPU), append(nc, n.serverCPU)
		kp, np = append(kp, float64(r.p50)), append(np, float64(n.p50))
		pr := sc.value(r) / sc.value(n)
		if i == 0 || pr < s.pairMin {
			s.pairMin = pr
		}
		if i == 0 || pr > s.pairMax {
			s.pairMax = pr
		}
	}
	s.kiln, s.nginx = median(s.kilnValues), median(s.nginxValues)
	s.ratio = s.kiln / s.nginx
	s.kilnCPU, s.nginxCPU = median(kc), median(nc)
	s.kilnP50, s.nginxP50 = time.Duration(median(kp)), time.Duration(median(np))
	return s
}

func (b *bench) report(scenarios []scenario, large *narInfo) {
	fmt.Println()
	fmt.Printf("%-13s %14s %14s %7s %13s %10s %10s %9s %9s\n", "figure", "kiln", "nginx", "ratio", "pair ratios", "kiln p50", "nginx p50", "kiln CPU", "nginx CPU")
	for i := range scenarios {
		sc := &scenarios[i]
		s := sc.summarize()
		fmt.Printf("%-13s %8.1f %-5s %8.1f %-5s %7.2f %6.2f-%-6.2f %10s %10s %9.2f %9.2f\n",
			sc.name, s.kiln, sc.unit(), s.nginx, sc.unit(), s.ratio, s.pairMin, s.pairMax, s.kilnP50, s.nginxP50, s.kilnCPU, s.nginxCPU)
	}
	fmt.Println()
	fmt.Println("RESULT")
	fmt.Printf("setup: %d CPUs, %s, wrk %s per run, median of %d interleaved kiln/nginx runs, c=1 runs pinned: %s; NAR = %d MiB random blob, FileSize kiln %d B, nginx %d B; load average at the end %s\n",
		runtime.NumCPU(), runtime.GOOS+"/"+runtime.GOARCH, b.duration, b.reps, b.pin, b.largeMiB, large.fileSize["kiln"], large.fileSize["nginx"], loadAvg())
	for i := range scenarios {
		sc := &scenarios[i]
		s := sc.summarize()
		met := "met"
		if s.ratio < sc.target {
			met = "NOT met"
		}
		prec := 0
		if sc.metric == mibPerSec {
			prec = 1
		}
		fmt.Printf("%s: kiln %.*f %s, nginx %.*f %s, ratio %.2f (target >= %.1f: %s)\n",
			sc.name, prec, s.kiln, sc.unit(), prec, s.nginx, sc.unit(), s.ratio, sc.target, met)
	}
	fmt.Println("(MiB = 2^20 bytes of HTTP response, headers included, as wrk counts them; CPU = cores the server process tree used during the run)")
}
