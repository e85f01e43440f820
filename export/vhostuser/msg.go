package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// Front-end requests, by the numbers of qemu's docs/interop/vhost-user.rst.
const (
	reqGetFeatures         = 1
	reqSetFeatures         = 2
	reqSetOwner            = 3
	reqResetOwner          = 4
	reqSetMemTable         = 5
	reqSetLogBase          = 6
	reqSetLogFD            = 7
	reqSetVringNum         = 8
	reqSetVringAddr        = 9
	reqSetVringBase        = 10
	reqGetVringBase        = 11
	reqSetVringKick        = 12
	reqSetVringCall        = 13
	reqSetVringErr         = 14
	reqGetProtocolFeatures = 15
	reqSetProtocolFeatures = 16
	reqGetQueueNum         = 17
	reqSetVringEnable      = 18
	reqGetConfig           = 24
	reqSetConfig           = 25
	reqGetInflightFD       = 31
	reqSetInflightFD       = 32
	reqResetDevice         = 34
	reqGetMaxMemSlots      = 36
	reqAddMemReg           = 37
	reqRemMemReg           = 38
	reqSetStatus           = 39
	reqGetStatus           = 40
)

var requestNames = map[uint32]string{
	reqGetFeatures: "GET_FEATURES", reqSetFeatures: "SET_FEATURES", reqSetOwner: "SET_OWNER",
	reqResetOwner: "RESET_OWNER", reqSetMemTable: "SET_MEM_TABLE", reqSetLogBase: "SET_LOG_BASE",
	reqSetLogFD: "SET_LOG_FD", reqSetVringNum: "SET_VRING_NUM", reqSetVringAddr: "SET_VRING_ADDR",
	reqSetVringBase: "SET_VRING_BASE", reqGetVringBase: "GET_VRING_BASE", reqSetVringKick: "SET_VRING_KICK",
	reqSetVringCall: "SET_VRING_CALL", reqSetVringErr: "SET_VRING_ERR",
	reqGetProtocolFeatures: "GET_PROTOCOL_FEATURES", reqSetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	reqGetQueueNum: "GET_QUEUE_NUM", reqSetVringEnable: "SET_VRING_ENABLE", reqGetConfig: "GET_CONFIG",
	reqSetConfig: "SET_CONFIG", reqGetInflightFD: "GET_INFLIGHT_FD", reqSetInflightFD: "SET_INFLIGHT_FD",
	reqResetDevice: "RESET_DEVICE", reqGetMaxMemSlots: "GET_MAX_MEM_SLOTS", reqAddMemReg: "ADD_MEM_REG",
	reqRemMemReg: "REM_MEM_REG", reqSetStatus: "SET_STATUS", reqGetStatus: "GET_STATUS",
}

func requestName(r uint32) string {
	if n, ok := requestNames[r]; ok {
		return n
	}
	return fmt.Sprintf("request %d", r)
}

// Protocol features.
const (
	protoMQ               = 1 << 0
	protoReplyAck         = 1 << 3
	protoConfig           = 1 << 9
	protoInflight         = 1 << 12
	protoResetDevice      = 1 << 13
	protoConfigureMemSlot = 1 << 15
	protoStatus           = 1 << 16

	supportedProtocolFeatures = protoMQ | protoReplyAck | protoConfig | protoInflight | protoResetDevice | protoConfigureMemSlot | protoStatus
)

// Feature bits of the vhost and virtio layers that this package handles.
const (
	// FeatureProtocolFeatures is VHOST_USER_F_PROTOCOL_FEATURES.
	FeatureProtocolFeatures = 1 << 30
	// FeatureVersion1 is VIRTIO_F_VERSION_1.
	FeatureVersion1 = 1 << 32
	// FeatureIndirectDesc is VIRTIO_RING_F_INDIRECT_DESC.
	FeatureIndirectDesc = 1 << 28
	// FeatureEventIdx is VIRTIO_RING_F_EVENT_IDX.
	FeatureEventIdx = 1 << 29

	ringFeatures = FeatureProtocolFeatures | FeatureVersion1 | FeatureIndirectDesc | FeatureEventIdx
)

// Header flags.
const (
	flagVersion   = 0x1
	flagReply     = 1 << 2
	flagNeedReply = 1 << 3
)

const (
	headerLen  = 12
	maxPayload = 4096 // the largest a front-end sends: a memory table of 8 regions is 328 bytes
	maxFDs     = 8
	maxRegions = 8   // in SET_MEM_TABLE
	maxSlots   = 509 // ADD_MEM_REG, as many as qemu uses
)

// A message is one request or reply, with the file descriptors that came
// with it.
type message struct {
	request uint32
	flags   uint32
	payload []byte
	fds     []int
}

var errShort = errors.New("short payload")

func (m *message) u64() (uint64, error) {
	if len(m.payload) < 8 {
		return 0, fmt.Errorf("%s: %w (%d bytes, want 8)", requestName(m.request), errShort, len(m.payload))
	}
	return binary.LittleEndian.Uint64(m.payload), nil
}

// state returns a vring state description: an index and a number.
func (m *message) state() (index, num uint32, err error) {
	if len(m.payload) < 8 {
		return 0, 0, fmt.Errorf("%s: %w (%d bytes, want 8)", requestName(m.request), errShort, len(m.payload))
	}
	return binary.LittleEndian.Uint32(m.payload), binary.LittleEndian.Uint32(m.payload[4:]), nil
}

// closeFDs closes the descriptors the message brought that nothing took.
func (m *message) closeFDs() {
	for _, fd := range m.fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	m.fds = nil
}

// takeFD returns the message's only descriptor, which the caller then
// owns, or -1.
func (m *message) takeFD() int {
	if len(m.fds) != 1 {
		return -1
	}
	fd := m.fds[0]
	m.fds[0] = -1
	return fd
}

// readMessage reads one message from c: a 12-byte header and its
// payload, with the descriptors sent along with them.
func readMessage(c *net.UnixConn, buf []byte) (*message, error) {
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf[:headerLen], oob)
	if err != nil {
		return nil, err
	}
	fds, ferr := parseFDs(oob[:oobn])
	m := &message{fds: fds}
	if ferr != nil {
		m.closeFDs()
		return nil, ferr
	}
	if n < headerLen {
		if _, err := io.ReadFull(c, buf[n:headerLen]); err != nil {
			m.closeFDs()
			return nil, err
		}
	}
	m.request = binary.LittleEndian.Uint32(buf)
	m.flags = binary.LittleEndian.Uint32(buf[4:])
	size := binary.LittleEndian.Uint32(buf[8:])
	if m.flags&0x3 != flagVersion {
		m.closeFDs()
		return nil, fmt.Errorf("%s: protocol version %d, want 1", requestName(m.request), m.flags&0x3)
	}
	if size > maxPayload {
		m.closeFDs()
		return nil, fmt.Errorf("%s: payload of %d bytes, more than %d", requestName(m.request), size, maxPayload)
	}
	m.payload = make([]byte, size)
	if _, err := io.ReadFull(c, m.payload); err != nil {
		m.closeFDs()
		return nil, err
	}
	return m, nil
}

// parseFDs returns the descriptors passed in oob.
func parseFDs(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var fds []int
	for _, cm := range msgs {
		if cm.Header.Level != unix.SOL_SOCKET || cm.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		f, err := unix.ParseUnixRights(&cm)
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			return nil, fmt.Errorf("control message: %w", err)
		}
		fds = append(fds, f...)
	}
	return fds, nil
}

// writeReply sends the reply to request req with payload p, and the
// descriptors fds.
func writeReply(c *net.UnixConn, req uint32, p []byte, fds ...int) error {
	b := make([]byte, headerLen+len(p))
	binary.LittleEndian.PutUint32(b, req)
	binary.LittleEndian.PutUint32(b[4:], flagVersion|flagReply)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(p)))
	copy(b[headerLen:], p)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := c.WriteMsgUnix(b, oob, nil)
	return err
}

func u64Payload(v uint64) []byte {
	return binary.LittleEndian.AppendUint64(nil, v)
}
