%% chat: the chat server of examples/chat, in Erlang/OTP, for the chat load
%% benchmark (scripts/bench chat, driven by chatload.c); see BENCHMARKS.md.
%%
%% Args (key=value): port (TCP port, 0 = any free one), host (listen address,
%% default 127.0.0.1), acceptors (processes calling gen_tcp:accept, default 4),
%% nodelay (1: TCP_NODELAY on every connection, the default; 0: Nagle),
%% hibernate_after (ms; a user or room with no message for that long calls
%% erlang:hibernate/3, as gen_server's hibernate_after; 0, the default: never).
%% Prints one line "listening port=<port> pid=<os pid>" when it accepts
%% connections, then nothing per connection or message; it runs until killed.
%%
%% The line protocol is the one of examples/chat (see its README):
%%   on connect  "* welcome guest<N>: /nick <name>, /join <room>, /who, /quit"
%%   /nick x     "* you are x"
%%   /join r     "* joined r" (leaves the previous room; the others there get
%%               "* <nick> left <old>", the members of r "* <nick> joined r")
%%   /who        "* in r: a, b, ..." or "* not in a room"
%%   /quit       "* bye", then close
%%   text        every other member of the room gets "[r] <nick>: text"
%%               (not in a room: "* join a room first")
%%   /other      "* unknown command /other"
%% Structure: one process per connected user (gen_tcp, {packet, line}), one
%% process per room that monitors its members, and a registry process that
%% creates rooms (an ETS table maps a room's name to its pid for lookups).
-module(chat).
-export([main/0, main/1, user/1, room/2]).

main() -> main([]).

main(Args) ->
    Port = arg(Args, "port", 0),
    Host = arg_str(Args, "host", "127.0.0.1"),
    NAcc = arg(Args, "acceptors", 4),
    NoDelay = arg(Args, "nodelay", 1) =:= 1,
    Hib = arg(Args, "hibernate_after", 0),
    persistent_term:put(chat_hibernate_after, case Hib of 0 -> infinity; _ -> Hib end),
    {ok, Ip} = inet:parse_address(Host),
    ets:new(chat_rooms, [named_table, public, set, {read_concurrency, true}]),
    Registry = spawn(fun registry/0),
    register(chat_registry, Registry),
    {ok, L} = gen_tcp:listen(Port, [binary, {packet, line}, {active, false},
                                    {reuseaddr, true}, {backlog, 4096}, {ip, Ip},
                                    {nodelay, NoDelay}]),
    {ok, Actual} = inet:port(L),
    Counter = counters:new(1, [write_concurrency]),
    [spawn(fun() -> acceptor(L, Counter) end) || _ <- lists:seq(1, NAcc)],
    io:format("listening port=~b pid=~s~n", [Actual, os:getpid()]),
    receive stop -> erlang:halt(0) end.

%% -- accepting --------------------------------------------------------------

acceptor(L, Counter) ->
    case gen_tcp:accept(L) of
        {ok, S} ->
            counters:add(Counter, 1, 1),
            N = counters:get(Counter, 1),
            Pid = spawn(fun() -> receive {go, S} -> user_start(S, N) end end),
            ok = gen_tcp:controlling_process(S, Pid),
            Pid ! {go, S},
            acceptor(L, Counter);
        {error, _} ->
            %% e.g. emfile: wait a little rather than spin
            timer:sleep(10),
            acceptor(L, Counter)
    end.

%% -- a user -----------------------------------------------------------------

-record(u, {sock, nick, room = none, rpid = none}).

user_start(S, N) ->
    Nick = <<"guest", (integer_to_binary(N))/binary>>,
    gen_tcp:send(S, [<<"* welcome ">>, Nick, <<": /nick <name>, /join <room>, /who, /quit\n">>]),
    ok = inet:setopts(S, [{active, 32}]),
    user(#u{sock = S, nick = Nick}).

user(U = #u{sock = S}) ->
    receive
        {tcp, S, Data} ->
            user(line(strip(Data), U));
        {tcp_passive, S} ->
            ok = inet:setopts(S, [{active, 32}]),
            user(U);
        {deliver, Bin} ->
            case gen_tcp:send(S, Bin) of
                ok -> user(U);
                {error, _} -> exit(normal)
            end;
        {tcp_closed, S} -> exit(normal);
        {tcp_error, S, _} -> exit(normal)
    after persistent_term:get(chat_hibernate_after) ->
        erlang:hibernate(?MODULE, user, [U])
    end.

line(<<"/nick ", Nick/binary>>, U) when Nick =/= <<>> ->
    case U#u.rpid of none -> ok; R -> R ! {nick, self(), Nick} end,
    out(U, [<<"* you are ">>, Nick, $\n]),
    U#u{nick = Nick};
line(<<"/join ", Room/binary>>, U) when Room =/= <<>> ->
    case U#u.rpid of none -> ok; Old -> Old ! {leave, self()} end,
    R = room_pid(Room),
    R ! {join, self(), U#u.nick},
    out(U, [<<"* joined ">>, Room, $\n]),
    U#u{room = Room, rpid = R};
line(<<"/who">>, U = #u{rpid = none}) ->
    out(U, <<"* not in a room\n">>), U;
line(<<"/who">>, U = #u{rpid = R, room = Room}) ->
    Ref = monitor(process, R),
    R ! {who, self(), Ref},
    receive
        {who, Ref, Nicks} ->
            demonitor(Ref, [flush]),
            out(U, [<<"* in ">>, Room, <<": ">>, lists:join(<<", ">>, Nicks), $\n]);
        {'DOWN', Ref, process, R, _} ->
            out(U, <<"* not in a room\n">>)
    end,
    U;
line(<<"/quit">>, U) ->
    out(U, <<"* bye\n">>),
    gen_tcp:close(U#u.sock),
    exit(normal);
line(<<"/", Cmd/binary>>, U) ->
    [Word | _] = binary:split(Cmd, <<" ">>),
    out(U, [<<"* unknown command /">>, Word, $\n]), U;
line(<<>>, U) -> U;
line(_Text, U = #u{rpid = none}) ->
    out(U, <<"* join a room first\n">>), U;
line(Text, U = #u{rpid = R, room = Room, nick = Nick}) ->
    R ! {say, self(), iolist_to_binary([$[, Room, <<"] ">>, Nick, <<": ">>, Text, $\n])},
    U.

out(#u{sock = S}, Data) ->
    case gen_tcp:send(S, Data) of
        ok -> ok;
        {error, _} -> exit(normal)
    end.

strip(<<>>) -> <<>>;
strip(B) ->
    case binary:last(B) of
        $\n -> strip(binary:part(B, 0, byte_size(B) - 1));
        $\r -> strip(binary:part(B, 0, byte_size(B) - 1));
        _ -> B
    end.

%% -- rooms ------------------------------------------------------------------

room_pid(Name) ->
    case ets:lookup(chat_rooms, Name) of
        [{_, Pid}] -> Pid;
        [] ->
            Ref = make_ref(),
            chat_registry ! {room, Name, self(), Ref},
            receive {Ref, Pid} -> Pid end
    end.

%% The registry creates rooms one at a time, so that two users joining a new
%% room at once get the same process.
registry() ->
    receive
        {room, Name, From, Ref} ->
            Pid = case ets:lookup(chat_rooms, Name) of
                      [{_, P}] -> P;
                      [] ->
                          P = spawn(fun() -> room(Name, #{}) end),
                          ets:insert(chat_rooms, {Name, P}),
                          P
                  end,
            From ! {Ref, Pid},
            registry()
    end.

%% Members: #{Pid => {Nick, MonitorRef}}.
room(Name, M) ->
    receive
        {say, From, Bin} ->
            fanout(From, {deliver, Bin}, M),
            room(Name, M);
        {join, Pid, Nick} ->
            M1 = case M of
                     #{Pid := {_, Ref0}} -> demonitor(Ref0, [flush]), maps:remove(Pid, M);
                     _ -> M
                 end,
            fanout(Pid, {deliver, iolist_to_binary([<<"* ">>, Nick, <<" joined ">>, Name, $\n])}, M1),
            room(Name, M1#{Pid => {Nick, monitor(process, Pid)}});
        {leave, Pid} ->
            room(Name, gone(Name, Pid, M, true));
        {nick, Pid, Nick} ->
            case M of
                #{Pid := {_, Ref}} -> room(Name, M#{Pid := {Nick, Ref}});
                _ -> room(Name, M)
            end;
        {who, Pid, Ref} ->
            Pid ! {who, Ref, [N || {N, _} <- maps:values(M)]},
            room(Name, M);
        {'DOWN', _, process, Pid, _} ->
            room(Name, gone(Name, Pid, M, false))
    after persistent_term:get(chat_hibernate_after) ->
        erlang:hibernate(?MODULE, room, [Name, M])
    end.

gone(Name, Pid, M, Demonitor) ->
    case M of
        #{Pid := {Nick, Ref}} ->
            Demonitor andalso demonitor(Ref, [flush]),
            M1 = maps:remove(Pid, M),
            fanout(Pid, {deliver, iolist_to_binary([<<"* ">>, Nick, <<" left ">>, Name, $\n])}, M1),
            M1;
        _ -> M
    end.

fanout(From, Msg, M) ->
    maps:foreach(fun(P, _) when P =:= From -> ok;
                    (P, _) -> P ! Msg
                 end, M).

%% -- arguments --------------------------------------------------------------

arg(Args, Key, Default) ->
    case arg_str(Args, Key, none) of
        none -> Default;
        V -> list_to_integer(V)
    end.

arg_str([], _, Default) -> Default;
arg_str([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> V;
        _ -> arg_str(Rest, Key, Default)
    end.
