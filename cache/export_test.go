package cache

// FastParse exposes parseFast to the fuzz test.
type FastParse struct {
	Verdict string // "more", "serve" or "handoff"
	N       int
	Head    bool
	Hash    string
	INM     *string
	Close   bool
}

func ParseFast(b []byte) FastParse {
	req, n, v := parseFast(b)
	p := FastParse{Verdict: [...]string{"more", "serve", "handoff"}[v], N: n, Head: req.head, Hash: string(req.hash), Close: req.close}
	if req.inm != nil {
		s := string(req.inm)
		p.INM = &s
	}
	return p
}
