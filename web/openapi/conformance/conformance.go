// Package conformance checks HTTP answers against Kiln's OpenAPI descriptions (for tests).
package conformance

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
)

// Load parses an OpenAPI 3 document (YAML or JSON) and validates it,
// including its examples against their schemas.
func Load(data []byte) (*openapi3.T, error) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(data)
	if err != nil {
		return nil, fmt.Errorf("openapi: load: %w", err)
	}
	if err := doc.Validate(context.Background(), openapi3.EnableExamplesValidation()); err != nil {
		return nil, fmt.Errorf("openapi: validate: %w", err)
	}
	return doc, nil
}

// Checker checks HTTP responses against the operations of one document.
// It validates responses only: requests are never validated, so tests may
// send deliberately bad ones.
type Checker struct {
	router  routers.Router
	options *openapi3filter.Options
}

// NewChecker builds a Checker for doc, which must have been loaded and
// validated (see Load). The document's servers are ignored: every path is
// routed from "/" on any host, so requests to loopback test servers (or
// built with httptest.NewRequest) find their operations. doc is not modified.
func NewChecker(doc *openapi3.T) (*Checker, error) {
	if doc == nil || doc.Paths == nil {
		return nil, errors.New("openapi: NewChecker: no document or no paths")
	}
	local := *doc
	local.Servers = openapi3.Servers{{URL: "/"}}
	paths := openapi3.NewPaths()
	for path, item := range doc.Paths.Map() {
		if len(item.Servers) > 0 {
			cp := *item
			cp.Servers = nil
			item = &cp
		}
		paths.Set(path, item)
	}
	local.Paths = paths
	router, err := gorillamux.NewRouter(&local)
	if err != nil {
		return nil, fmt.Errorf("openapi: router: %w", err)
	}
	return &Checker{
		router: router,
		options: &openapi3filter.Options{
			// kin-openapi accepts any status an operation does not declare
			// unless told otherwise; Check also enforces this itself, since
			// ValidateResponse skips 301, 304, 307 and 308 altogether.
			IncludeResponseStatus: true,
			MultiError:            true,
		},
	}, nil
}

// Check validates one response to req: the spec must have an operation for
// req's method and path, the status must be one the operation declares (or
// covered by its default response), the Content-Type must be one declared
// for that status, JSON bodies must match the schema and declared response
// headers (such as a required Location) must be present and valid. Headers
// the spec does not declare are ignored.
//
// A 404 or 405 answer to a request the spec has no operation for is checked
// with CheckError instead, so tests may probe unknown routes and methods.
func (c *Checker) Check(ctx context.Context, req *http.Request, status int, header http.Header, body []byte) error {
	route, pathParams, err := c.router.FindRoute(req)
	if err != nil {
		if (errors.Is(err, routers.ErrPathNotFound) || errors.Is(err, routers.ErrMethodNotAllowed)) &&
			(status == http.StatusNotFound || status == http.StatusMethodNotAllowed) {
			if err := c.CheckError(status, header, body); err != nil {
				return fmt.Errorf("%s %s (not in the spec): %w", req.Method, req.URL.Path, err)
			}
			return nil
		}
		return fmt.Errorf("%s %s: the spec has no such operation (%v), yet it answered %d", req.Method, req.URL.Path, err, status)
	}
	responses := route.Operation.Responses
	if responses == nil || (responses.Status(status) == nil && responses.Default() == nil) {
		return fmt.Errorf("%s %s: status %d is not declared for operation %s %s", req.Method, req.URL.Path, status, route.Method, route.Path)
	}
	input := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{
			Request:    req,
			PathParams: pathParams,
			Route:      route,
			Options:    c.options,
		},
		Status:  status,
		Header:  header,
		Options: c.options,
	}
	if header == nil {
		input.Header = http.Header{}
	}
	input.SetBodyBytes(body)
	if err := openapi3filter.ValidateResponse(ctx, input); err != nil {
		return fmt.Errorf("%s %s -> %d: %w", req.Method, req.URL.Path, status, err)
	}
	return nil
}

// CheckError checks an error answer to a route the spec does not describe:
// the status must be 4xx or 5xx, the Content-Type application/json and the
// body a JSON object whose "error" member is a non-empty string.
func (c *Checker) CheckError(status int, header http.Header, body []byte) error {
	if status < 400 || status > 599 {
		return fmt.Errorf("status %d is not an error status", status)
	}
	ct := header.Get("Content-Type")
	mediaType, _, err := mime.ParseMediaType(ct)
	if err != nil || mediaType != "application/json" {
		return fmt.Errorf("status %d: Content-Type %q, want application/json", status, ct)
	}
	var object map[string]json.RawMessage
	if err := json.Unmarshal(body, &object); err != nil || object == nil {
		return fmt.Errorf("status %d: body is not a JSON object: %q", status, truncate(body))
	}
	raw, ok := object["error"]
	if !ok {
		return fmt.Errorf("status %d: body has no \"error\" member: %q", status, truncate(body))
	}
	var msg string
	if err := json.Unmarshal(raw, &msg); err != nil {
		return fmt.Errorf("status %d: \"error\" is not a string: %s", status, raw)
	}
	if msg == "" {
		return fmt.Errorf("status %d: \"error\" is empty", status)
	}
	return nil
}

func truncate(b []byte) string {
	const max = 200
	if len(b) > max {
		return string(b[:max]) + "…"
	}
	return string(b)
}

// Operation names the operation req maps to, as "METHOD /path/{template}",
// or "" when the document has none.
func (c *Checker) Operation(req *http.Request) string {
	route, _, err := c.router.FindRoute(req)
	if err != nil {
		return ""
	}
	return route.Method + " " + route.Path
}

// Operations lists every operation of doc as "METHOD /path/{template}".
func Operations(doc *openapi3.T) []string {
	var out []string
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			out = append(out, method+" "+path)
		}
	}
	return out
}
