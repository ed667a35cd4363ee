package web

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// SessionCookie is the cookie POST /login sets.
const SessionCookie = "kiln_session"

// SessionTTL is how long a login lasts.
const SessionTTL = 24 * time.Hour

// authorize admits the admin token, or a session of a user holding role
// or "admin". No credentials is ErrUnauthenticated; credentials without
// the right is ErrForbidden.
func (a *api) authorize(r *http.Request, role string) error {
	_, hasBasic := r.Header["Authorization"]
	if hasBasic && a.cfg.AdminAuth != nil {
		return a.cfg.AdminAuth(r)
	}
	c, err := r.Cookie(SessionCookie)
	if err != nil {
		if a.cfg.AdminAuth != nil {
			return a.cfg.AdminAuth(r) // says what is missing
		}
		return fmt.Errorf("%w: log in or send the admin token", raftfsm.ErrUnauthenticated)
	}
	name, err := a.verifySession(c.Value, time.Now())
	if err != nil {
		return err
	}
	u, err := a.cfg.Backend.Read().User(name)
	if errors.Is(err, raftfsm.ErrNotFound) {
		return fmt.Errorf("%w: user %q no longer exists", raftfsm.ErrUnauthenticated, name)
	}
	if err != nil {
		return err
	}
	if slices.Contains(u.Roles, "admin") || slices.Contains(u.Roles, role) {
		return nil
	}
	return fmt.Errorf("%w: user %q lacks the %q role", raftfsm.ErrForbidden, name, role)
}

// newSession makes "name.expiry.mac" (the name is base64url).
func (a *api) newSession(name string, now time.Time) string {
	body := base64.RawURLEncoding.EncodeToString([]byte(name)) + "." + strconv.FormatInt(now.Add(SessionTTL).Unix(), 10)
	return body + "." + a.sessionMAC(body)
}

func (a *api) sessionMAC(body string) string {
	m := hmac.New(sha256.New, a.cfg.SessionKey)
	m.Write([]byte("kiln-session\x00" + body))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func (a *api) verifySession(v string, now time.Time) (string, error) {
	bad := fmt.Errorf("%w: session not valid; log in again", raftfsm.ErrUnauthenticated)
	if len(a.cfg.SessionKey) == 0 || len(v) > 512 {
		return "", bad
	}
	i := strings.LastIndexByte(v, '.')
	if i < 0 || !hmac.Equal([]byte(v[i+1:]), []byte(a.sessionMAC(v[:i]))) {
		return "", bad
	}
	enc, exp, ok := strings.Cut(v[:i], ".")
	if !ok {
		return "", bad
	}
	until, err := strconv.ParseInt(exp, 10, 64)
	if err != nil || now.Unix() >= until {
		return "", fmt.Errorf("%w: session expired; log in again", raftfsm.ErrUnauthenticated)
	}
	name, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		return "", bad
	}
	return string(name), nil
}

type loginJSON struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

type userJSON struct {
	Username     string   `json:"username"`
	FullName     string   `json:"fullname"`
	EmailAddress string   `json:"emailaddress"`
	UserRoles    []string `json:"userroles"`
}

func userOut(u *pb.User) userJSON {
	roles := u.Roles
	if roles == nil {
		roles = []string{}
	}
	return userJSON{Username: u.Name, FullName: u.FullName, EmailAddress: u.Email, UserRoles: roles}
}

// dummyHash makes a failed lookup cost as much as a wrong password.
// It is made on first use, not at start-up (bcrypt costs ~60 ms).
var dummyHash = sync.OnceValue(func() []byte {
	h, _ := bcrypt.GenerateFromPassword([]byte("kiln"), bcrypt.DefaultCost)
	return h
})

// login is Hydra's POST /login: JSON credentials in, user out, session
// cookie set. Any failure is 403, as in Hydra.
func (a *api) login(w http.ResponseWriter, r *http.Request) {
	var req loginJSON
	if err := decodeJSON(w, r, 64<<10, &req); err != nil {
		WriteError(w, err)
		return
	}
	if req.Username == "" || len(req.Password) > 72 {
		WriteError(w, fmt.Errorf("%w: give username and password (at most 72 bytes)", raftfsm.ErrInvalid))
		return
	}
	u, err := a.cfg.Backend.Read().User(req.Username)
	if errors.Is(err, raftfsm.ErrNotFound) {
		// The user may have been made through another node a moment ago.
		ctx, cancel := context.WithTimeout(r.Context(), a.cfg.MaxWait)
		if a.cfg.Backend.CatchUp(ctx) == nil {
			u, err = a.cfg.Backend.Read().User(req.Username)
		}
		cancel()
	}
	hash := dummyHash()
	if err == nil {
		hash = u.PasswordHash
	}
	if bcrypt.CompareHashAndPassword(hash, []byte(req.Password)) != nil || err != nil || len(a.cfg.SessionKey) == 0 {
		WriteError(w, fmt.Errorf("%w: bad username or password", raftfsm.ErrForbidden))
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: SessionCookie, Value: a.newSession(u.Name, time.Now()), Path: "/",
		MaxAge: int(SessionTTL / time.Second), HttpOnly: true, SameSite: http.SameSiteLaxMode, Secure: r.TLS != nil,
	})
	WriteJSON(w, http.StatusOK, userOut(u))
}

type putUserJSON struct {
	FullName string   `json:"fullname"`
	Email    string   `json:"emailaddress"`
	Roles    []string `json:"userroles"`
	Password string   `json:"password"`
}

// putUser creates or replaces a user (admin only).
func (a *api) putUser(w http.ResponseWriter, r *http.Request) {
	var req putUserJSON
	if err := decodeJSON(w, r, 64<<10, &req); err != nil {
		WriteError(w, err)
		return
	}
	if len(req.Password) < 8 || len(req.Password) > 72 {
		WriteError(w, fmt.Errorf("%w: password must be 8 to 72 bytes", raftfsm.ErrInvalid))
		return
	}
	u := &pb.User{Name: r.PathValue("name"), FullName: req.FullName, Email: req.Email, Roles: req.Roles, PasswordHash: []byte("$2")}
	if err := raftfsm.ValidateUser(u); err != nil {
		WriteError(w, err)
		return
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(req.Password), bcrypt.DefaultCost)
	if err != nil {
		WriteError(w, err)
		return
	}
	u.PasswordHash = hash
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_PUT_USER, &pb.PutUser{User: u}); err != nil {
		WriteError(w, err)
		return
	}
	stored, err := a.cfg.Backend.Read().User(u.Name)
	if err != nil {
		WriteError(w, err)
		return
	}
	WriteJSON(w, http.StatusOK, userOut(stored))
}

func (a *api) deleteUser(w http.ResponseWriter, r *http.Request) {
	if _, err := a.apply(r.Context(), pb.CommandType_COMMAND_TYPE_DELETE_USER, &pb.DeleteUser{Name: r.PathValue("name")}); err != nil {
		WriteError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *api) listUsers(w http.ResponseWriter, r *http.Request) {
	us, err := a.cfg.Backend.Read().Users()
	if err != nil {
		WriteError(w, err)
		return
	}
	out := make([]userJSON, len(us))
	for i, u := range us {
		out[i] = userOut(u)
	}
	WriteJSON(w, http.StatusOK, out)
}
