package agent

import (
	"context"
	"errors"
	"io"

	"connectrpc.com/connect"
)

// streamCall makes a client-streaming call: open starts it (under a
// context streamCall cancels), with the credential; send sends the
// request's messages through s, which keeps the first failed send's error
// and drops what follows. Meanwhile the answer (one Res, then the end) is
// read from the stream's read side as soon as it comes: a coordinator
// that refuses a call (a lease no longer ours) answers before reading the
// rest and then closes the connection, and over HTTP/1.1 the failed write
// would lose the answer if it were read only after sending failed (through
// a follower, whose answer's body comes after its header, it was). An
// answer that comes early cancels the sending. An error from send while
// every send succeeded abandons the call (no end of request is sent) and
// is returned; otherwise the answer is, or else the failed send's error.
func streamCall[Res any](ctx context.Context, credential string, open func(context.Context) (connect.StreamingClientConn, error), send func(s *streamSender) error) (*Res, error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	conn, err := open(sctx)
	if err != nil {
		return nil, err
	}
	conn.RequestHeader().Set("Authorization", "Bearer "+credential)
	type answer struct {
		msg *Res
		err error
	}
	answered := make(chan answer, 1)
	go func() {
		// Owned by streamCall, which always waits for it: it ends with
		// the answer, or when sctx is cancelled.
		msg, err := receiveAnswer[Res](conn)
		cancel()
		answered <- answer{msg, err}
	}()
	s := &streamSender{conn: conn}
	if err := send(s); err != nil && s.err == nil {
		cancel()
		<-answered
		return nil, err
	}
	_ = conn.CloseRequest()
	a := <-answered
	if a.err == nil && s.err != nil {
		a.err = s.err // the connection broke, or an answer came before the end
	}
	if a.err != nil {
		return nil, a.err
	}
	return a.msg, nil
}

// streamSender is the write side of a streamCall.
type streamSender struct {
	conn connect.StreamingClientConn
	err  error
}

// Send sends m, unless an earlier send failed.
func (s *streamSender) Send(m any) {
	if s.err == nil {
		s.err = s.conn.Send(m)
	}
}

// receiveAnswer reads the answer to a client-streaming call from its read
// side (which may run while the write side sends): one message, then the
// end, as the generated client's CloseAndReceive reads it.
func receiveAnswer[Res any](conn connect.StreamingClientConn) (*Res, error) {
	defer conn.CloseResponse()
	var msg Res
	if err := conn.Receive(&msg); err != nil {
		if errors.Is(err, io.EOF) {
			err = connect.NewError(connect.CodeUnimplemented, errors.New("the answer has no message"))
		}
		return nil, err
	}
	var more Res
	if err := conn.Receive(&more); !errors.Is(err, io.EOF) {
		if err == nil {
			err = connect.NewError(connect.CodeUnimplemented, errors.New("the answer has more than one message"))
		}
		return nil, err
	}
	return &msg, nil
}
