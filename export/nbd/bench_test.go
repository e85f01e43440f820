package nbd

import (
	"fmt"
	"io"
	"testing"

	"github.com/diskserve/diskserve/internal/disktest"
)

// BenchmarkServe measures requests through a real connection over a Unix
// socket, pipelined as deep as the socket buffers and the server's request
// limit allow, against an in-memory disk: the server's own cost per
// request, without a file system's.
func BenchmarkServe(b *testing.B) {
	for _, tc := range []struct {
		cmd  uint16
		size int
	}{{cmdRead, 4 << 10}, {cmdRead, 1 << 20}, {cmdWrite, 4 << 10}, {cmdWrite, 1 << 20}} {
		name := fmt.Sprintf("read/%dKiB", tc.size>>10)
		if tc.cmd == cmdWrite {
			name = fmt.Sprintf("write/%dKiB", tc.size>>10)
		}
		b.Run(name, func(b *testing.B) {
			d := disktest.NewMemory(make([]byte, 64<<20), false)
			_, path := start(b, []Export{{Disk: d}}, Options{})
			cl := attach(b, path, false)
			req := requestHeader(tc.cmd, 0, 1, 0, uint32(tc.size))
			replyLen := 16 + tc.size
			if tc.cmd == cmdWrite {
				req = append(req, make([]byte, tc.size)...)
				replyLen = 16
			}
			b.SetBytes(int64(tc.size))
			b.ReportAllocs()
			b.ResetTimer()
			done := make(chan struct{})
			go func() { // replies
				reply := make([]byte, replyLen)
				for range b.N {
					if _, err := io.ReadFull(cl.c, reply); err != nil {
						b.Error(err)
						break
					}
				}
				close(done)
			}()
			for i := range b.N {
				be.PutUint64(req[16:], uint64(i%(64<<20/tc.size))*uint64(tc.size))
				cl.c.Write(req)
			}
			<-done
		})
	}
}
