package main

import (
	"testing"
	"time"
)

const wrkSample = `Running 5s test @ http://127.0.0.1:38513/cache/as4r8k93j0n4cc20rkywfyj6qqmnk0vm.narinfo
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.60ms    3.85ms  69.09ms   96.12%
    Req/Sec    20.14k     1.72k   23.75k    74.00%
  Latency Distribution
     50%    1.26ms
     75%    1.51ms
     90%    1.94ms
     99%   69.09ms
  200415 requests in 5.00s, 133.22MB read
Requests/sec:  40083.36
Transfer/sec:     26.64MB
CACHEBENCH requests=200415 bytes=139692735 duration_us=5000000 connect=0 read=0 write=0 status=0 timeout=0 p50_us=1257 p99_us=69090
`

func TestParseWrk(t *testing.T) {
	r, err := parseWrk(wrkSample)
	if err != nil {
		t.Fatal(err)
	}
	if r.humanReqPerSec != 40083.36 || r.humanBytesPerSec != 26.64*(1<<20) {
		t.Errorf("human figures %v %v", r.humanReqPerSec, r.humanBytesPerSec)
	}
	if r.reqPerSec != 40083 || r.bytesPerSec != 139692735/5.0 || r.errors != 0 {
		t.Errorf("exact figures %v %v %v", r.reqPerSec, r.bytesPerSec, r.errors)
	}
	if r.p50 != 1257*time.Microsecond || r.p99 != 69090*time.Microsecond {
		t.Errorf("latency %v %v", r.p50, r.p99)
	}
	// Without the script's line the human lines are used.
	r, err = parseWrk("Requests/sec:     16.58\nTransfer/sec:      1.09GB\n")
	if err != nil {
		t.Fatal(err)
	}
	if r.reqPerSec != 16.58 || r.bytesPerSec != 1.09*(1<<30) {
		t.Errorf("fallback %v %v", r.reqPerSec, r.bytesPerSec)
	}
	if _, err := parseWrk("nothing"); err == nil {
		t.Error("no figures: no error")
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]float64{"512.00B": 512, "3.50KB": 3.5 * 1024, "26.64MB": 26.64 * (1 << 20), "1.09GB": 1.09 * (1 << 30)} {
		if got, err := parseBytes(in); err != nil || got != want {
			t.Errorf("parseBytes(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseBytes("12XB"); err == nil {
		t.Error("bad unit accepted")
	}
}

func TestMedian(t *testing.T) {
	if m := median([]float64{3, 1, 2}); m != 2 {
		t.Errorf("median odd = %v", m)
	}
	if m := median([]float64{4, 1, 2, 3}); m != 2.5 {
		t.Errorf("median even = %v", m)
	}
}
