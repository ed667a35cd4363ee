package gossip

import (
	"context"
	"log"
	"log/slog"
	"strings"
)

// NewStdLogger returns a *log.Logger (the kind memberlist's Config.Logger
// wants) that forwards every line to l with the attribute
// component=memberlist. The level comes from the line's "[LEVEL]" tag, as in
// "[DEBUG] memberlist: ..." (optionally preceded by a log.LstdFlags
// timestamp): DEBUG and TRACE log at Debug, INFO at Info, WARN at Warn, ERR
// and ERROR at Error; untagged lines log at Info.
func NewStdLogger(l *slog.Logger) *log.Logger {
	if l == nil {
		l = slog.Default()
	}
	return log.New(logWriter{l: l.With("component", "memberlist")}, "", 0)
}

type logWriter struct{ l *slog.Logger }

func (w logWriter) Write(b []byte) (int, error) {
	level, msg := parseLogLine(string(b))
	ctx := context.Background()
	if w.l.Enabled(ctx, level) {
		w.l.Log(ctx, level, msg)
	}
	return len(b), nil
}

// parseLogLine splits a memberlist log line into its level and message,
// dropping any timestamp, the [LEVEL] tag and the "memberlist: " prefix.
func parseLogLine(line string) (slog.Level, string) {
	line = strings.TrimRight(line, "\r\n")
	level, msg := slog.LevelInfo, line
	if open := strings.IndexByte(line, '['); open >= 0 {
		if end := strings.IndexByte(line[open:], ']'); end > 0 {
			tag := line[open+1 : open+end]
			if l, ok := logLevels[strings.ToUpper(tag)]; ok {
				level, msg = l, strings.TrimSpace(line[open+end+1:])
			}
		}
	}
	msg = strings.TrimPrefix(msg, "memberlist: ")
	return level, msg
}

var logLevels = map[string]slog.Level{
	"TRACE":   slog.LevelDebug,
	"DEBUG":   slog.LevelDebug,
	"INFO":    slog.LevelInfo,
	"WARN":    slog.LevelWarn,
	"WARNING": slog.LevelWarn,
	"ERR":     slog.LevelError,
	"ERROR":   slog.LevelError,
}
